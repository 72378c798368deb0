"""The image data registry: digits (bundled, the default), torchvision's sets, image folders and a user's own.

A data set is described by `{"name": ..., "dir": ..., "augment": ..., "normalize": ...}`, recorded in every
checkpoint `sample` writes, so later commands find the same data without `--data`. Each set comes as views:
the training set as training saw it (what training and BatchNorm recalibration see), the same images without
augmentation (training accuracy), a held-out validation split of both when the spec asks for one, and the test
set.

How training saw the images is a stated choice, never a guess made in silence: `augment` (none, crop-flip:
CIFAR's random crop of the image padded by 1/8 of its width and a horizontal flip, resized-crop-flip:
ImageNet's random resized crop and flip) and `normalize` (the mean and std of a named set, half: 0.5 and 0.5,
none: pixels in [0, 1]). `standard` names each registry set's own (`sample`'s default: the paper's crop and
flip for CIFAR). A spec without them was written before they were recorded, by a `sample` that used the
standard view; an image folder whose normalization nobody stated is normalized by the old rule, with a warning.

A spec read from a file never switches on a download (a runtime flag, never recorded) and never names code
to import: `package.module:callable` is loaded only when the user named it (`allow_code`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from twa_cli.errors import TwaError
from twa_cli.tasks.base import split_indices
from twa_cli.tasks.hooks import hook_splits, import_callable, is_code_name
from twa_cli.units import AUGMENTATIONS, NORMALIZATIONS, first_line

log = logging.getLogger("twa")

KNOWN = ("digits", "cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
# Image folders up to this width are decoded into memory and treated as CIFAR-like; larger ones as ImageNet-like.
SMALL_IMAGES = 64
_MEANS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5,), (0.5,)),
    "none": ((0.0,), (1.0,)),
}


@dataclass
class Datasets:
    train: Dataset
    train_eval: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    # Held out of `train` when the spec asks for a validation split (augmented and plain views).
    val: Dataset | None = None
    val_eval: Dataset | None = None


def known_data() -> str:
    return ", ".join(KNOWN) + ", package.module:callable"


def data_spec(name: str, data_dir: str | Path | None = None, val_split: float = 0.0) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name}
    if data_dir is not None:
        spec["dir"] = str(Path(data_dir).resolve())
    if val_split:
        if not 0.0 < val_split < 1.0:
            raise TwaError(f"--val-split must be between 0 and 1 (got {val_split})")
        spec["val_split"] = val_split
    return spec


def stated_views(spec: Mapping[str, Any], augment: str | None, normalize: str | None, *,
                 run: Mapping[str, Any] | None = None, fresh: bool, source: str | None = None) -> dict[str, Any]:
    """`spec` with the view of the images training saw stated: the flags (`standard` resolved to the set's
    own), else what the spec records, else, for a spec made from the flags (`fresh`), what the run's recorded
    spec `run` says of the same data set, else no augmentation (a run the tool did not write). A torchvision
    set's normalization is its own statistics unless said otherwise; an image folder's is left unstated (the
    loader says what it assumes)."""
    where = f"{source}: " if source else ""
    for key, known in (("augment", AUGMENTATIONS), ("normalize", NORMALIZATIONS)):
        value = spec.get(key)
        if value is not None and (not isinstance(value, str) or value not in known[1:]):
            raise TwaError(f"{where}its recorded data set has {key} {value!r}, not one of {', '.join(known[1:])}")
    name = spec["name"]
    if name not in KNOWN and not is_code_name(name):
        return dict(spec)  # the loader names what is unknown
    if name == "digits" or is_code_name(name):
        for flag, value, plain in (("--augment", augment, "none"), ("--normalize", normalize, None)):
            if value not in (None, "standard", plain):
                raise TwaError(f"{flag} {value}: the data set {name} comes as it is ("
                               f"{'standardized 8x8 digits' if name == 'digits' else 'your code makes its views'})")
        return dict(spec)
    out = dict(spec)
    same_run = run if fresh and isinstance(run, Mapping) and _same_set(run, spec) else None
    if augment is not None:
        out["augment"] = _standard_augment(out) if augment == "standard" else augment
    elif "augment" not in out and fresh:
        if same_run is None:
            out["augment"] = "none"
        elif "augment" in same_run:
            out["augment"] = same_run["augment"]
    if normalize is not None:
        out["normalize"] = _standard_normalize(out) if normalize == "standard" else normalize
    elif "normalize" not in out and same_run is not None and "normalize" in same_run:
        out["normalize"] = same_run["normalize"]
    elif "normalize" not in out and name in _MEANS:
        out["normalize"] = name
    return out


def _same_set(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.get("name") == b.get("name") and a.get("dir") == b.get("dir")


def _standard_augment(spec: Mapping[str, Any]) -> str:
    """What `sample` trains a registry set on: the paper's crop and flip for CIFAR (and CIFAR-like image folders),
    ImageNet's resized crop and flip for large image folders, none for MNIST."""
    name = spec["name"]
    if name.startswith("cifar"):
        return "crop-flip"
    if name == "imagefolder":
        return "crop-flip" if _folder_shape(spec.get("dir"))[2] <= SMALL_IMAGES else "resized-crop-flip"
    return "none"


def _standard_normalize(spec: Mapping[str, Any]) -> str:
    name = spec["name"]
    if name in _MEANS:
        return name
    _, channels, width = _folder_shape(spec.get("dir"))
    if width > SMALL_IMAGES:
        return "imagenet"
    return "cifar10" if channels == 3 else "half"


def _augmentation(spec: Mapping[str, Any], allowed: tuple[str, ...]) -> str:
    """The spec's augmentation (one written before it was recorded: the standard one `sample` used)."""
    augment = spec.get("augment") or _standard_augment(spec)
    if augment not in allowed:
        raise TwaError(f"--augment {augment}: not for {spec['name']} images of this size (choose "
                       f"{' or '.join(allowed)})")
    return augment


def _normalization(spec: Mapping[str, Any], channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the spec's normalization; an image folder's unstated one is the rule twa always
    used, said in a warning."""
    normalize = spec.get("normalize")
    if normalize is None:
        normalize = _standard_normalize(spec)
        log.warning("%s: normalizing the images with the %s mean and std, an assumption: nothing states how the "
                    "run normalized them; pass --normalize (%s) to say", spec.get("dir"), normalize,
                    ", ".join(NORMALIZATIONS[1:]))
    mean, std = _MEANS[normalize]
    if normalize in ("half", "none"):
        return mean * channels, std * channels
    if len(mean) != channels:
        raise TwaError(f"--normalize {normalize}: statistics of {len(mean)}-channel images; these images have "
                       f"{channels}")
    return mean, std


# Shapes of the built-in sets, so a model can be sized without loading the data: (classes, channels, size).
SHAPES = {"digits": (10, 1, 8), "cifar10": (10, 3, 32), "cifar100": (100, 3, 32), "mnist": (10, 1, 28),
          "fashion-mnist": (10, 1, 28)}


def data_shape(spec: dict[str, Any], *, allow_code: bool = False) -> tuple[int, int, int]:
    """(classes, input channels, image size) of a data set, without decoding it where that can be avoided."""
    name = _checked_name(spec, allow_code)
    if name in SHAPES:
        return SHAPES[name]
    if name == "imagefolder":
        return _folder_shape(spec.get("dir"))
    data = load_data(spec, allow_code=allow_code)
    return data.num_classes, data.in_channels, data.image_size


def load_data(spec: dict[str, Any], *, allow_code: bool = False, download: bool = False) -> Datasets:
    """Build the views of the data set a spec names (with a held-out validation split if it asks for one).
    `allow_code`: the user named this spec (it may name their code); `download`: fetch a missing
    torchvision set (only ever the user's flag)."""
    datasets = _load_views(spec, allow_code, download)
    if spec.get("val_split"):
        fraction = spec["val_split"]
        if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise TwaError(f"--val-split must be between 0 and 1 (got {fraction!r})")
        _carve_validation(datasets, float(fraction))
    return datasets


def _checked_name(spec: Any, allow_code: bool) -> str:
    if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
        raise TwaError(f"not a data set description: {spec!r}")
    name = spec["name"]
    if is_code_name(name) and not allow_code:
        raise TwaError(f"the data set '{name}' is Python code named by a file, not by you; pass --data {name} "
                       "to run it")
    if spec.get("dir") is not None and not isinstance(spec["dir"], str):
        raise TwaError(f"not a data set description: 'dir' is {spec['dir']!r}")
    return name


def _carve_validation(datasets: Datasets, fraction: float) -> None:
    train_idx, val_idx = split_indices(len(datasets.train), fraction)  # type: ignore[arg-type]
    datasets.val, datasets.val_eval = _subset(datasets.train, val_idx), _subset(datasets.train_eval, val_idx)
    datasets.train, datasets.train_eval = _subset(datasets.train, train_idx), _subset(datasets.train_eval, train_idx)


def _subset(dataset: Dataset, idx: torch.Tensor) -> Dataset:
    # Data held in memory stays on the fast, collation-free path (whole batches sliced and augmented at once).
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    if isinstance(dataset, ImageTensors):
        return ImageTensors(dataset.images[idx], dataset.targets[idx], dataset.mean.flatten().tolist(),
                            dataset.std.flatten().tolist(), augment=dataset.augment)
    return Subset(dataset, idx.tolist())


def _load_views(spec: dict[str, Any], allow_code: bool, download: bool) -> Datasets:
    name = _checked_name(spec, allow_code)
    data_dir = spec.get("dir")
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100", "mnist", "fashion-mnist"):
        return _torchvision_set(spec, data_dir, download)
    if name == "imagefolder":
        return _image_folder(spec, data_dir)
    if is_code_name(name):
        return _user_data(name, data_dir)
    raise TwaError(f"unknown data set '{name}'; known: {known_data()}")


def _digits() -> Datasets:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    # A fixed split (seed 0) so every command of every run sees the same 1347 training / 450 test images.
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(y)))
    train_idx, test_idx = order[:1347], order[1347:]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    train = TensorDataset(x[train_idx], y[train_idx])
    return Datasets(train, train, TensorDataset(x[test_idx], y[test_idx]), 10, 1, 8)


def _torchvision_set(spec: Mapping[str, Any], data_dir: str | None, download: bool) -> Datasets:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    name = spec["name"]
    if data_dir is None:
        raise TwaError(f"--data {name} needs --data-dir (add --download to fetch it there)")
    sets = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}
    cls = sets[name]
    _, channels, size = SHAPES[name]
    mean, std = _normalization(spec, channels)
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    augment = {"none": plain,
               "crop-flip": T.Compose([T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip(), plain]),
               "resized-crop-flip": T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), plain]),
               }[_augmentation(spec, AUGMENTATIONS[1:])]
    if not download and not Path(data_dir).is_dir():
        raise TwaError(f"--data-dir {data_dir}: no such folder (add --download to fetch {name} there)")
    try:
        train = cls(data_dir, train=True, transform=augment, download=download)
        train_eval = cls(data_dir, train=True, transform=plain, download=False)
        test = cls(data_dir, train=False, transform=plain, download=download)
    except RuntimeError as exc:
        raise TwaError(f"--data-dir {data_dir}: {name} not found there (add --download to fetch it)") from exc
    except OSError as exc:  # a network error while downloading, or a damaged file
        raise TwaError(f"--data {name} --data-dir {data_dir}: {first_line(exc)}") from exc
    return Datasets(train, train_eval, test, len(train.classes), channels, size)


def _image_folder(spec: Mapping[str, Any], data_dir: str | None) -> Datasets:
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    train_dir, test_dir = _folders(data_dir)
    val_dir = _val_folder(data_dir)
    classes, channels, width = _folder_shape(data_dir)
    if width <= SMALL_IMAGES:  # CIFAR-like: decoded once into memory, augmented per batch
        mean, std = _normalization(spec, channels)
        augment = _augmentation(spec, ("none", "crop-flip"))
        images, labels = decoded_folder(train_dir)
        train = ImageTensors(images, labels, mean, std, augment=augment == "crop-flip")
        train_eval = ImageTensors(images, labels, mean, std)
        test = ImageTensors(*decoded_folder(test_dir, reference=train_dir), mean, std)
        val = ImageTensors(*decoded_folder(val_dir, reference=train_dir), mean, std) if val_dir else None
        return Datasets(train, train_eval, test, classes, channels, width, val, val)
    # ImageNet-like: as in the PyTorch ImageNet example (every image read as RGB)
    mean, std = _normalization(spec, 3)
    norm = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    plain = T.Compose([T.Resize(256), T.CenterCrop(224), norm])
    augment = {"none": plain,
               "crop-flip": T.Compose([T.Resize(256), T.CenterCrop(224), T.RandomCrop(224, padding=28),
                                       T.RandomHorizontalFlip(), norm]),
               "resized-crop-flip": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), norm]),
               }[_augmentation(spec, AUGMENTATIONS[1:])]
    train = tvd.ImageFolder(str(train_dir), transform=augment, loader=load_rgb)
    train_eval = tvd.ImageFolder(str(train_dir), transform=plain, loader=load_rgb)
    test = _held_out_folder(test_dir, plain, train.class_to_idx)
    val = _held_out_folder(val_dir, plain, train.class_to_idx) if val_dir else None
    return Datasets(train, train_eval, test, len(train.classes), channels, 224, val, val)


def _held_out_folder(folder: Path, transform: Any, class_to_idx: dict[str, int]) -> Any:
    """A test or validation folder with the training folder's class numbers (it may lack some classes)."""
    from torchvision import datasets as tvd

    held = tvd.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    held.samples = held.imgs = [(path, class_to_idx[held.classes[label]]) for path, label in held.samples]
    held.targets = [label for _, label in held.samples]
    return held


def load_rgb(path: str) -> Any:
    """An image of a large image folder, read as it is needed: a damaged one is named (PIL's "image file is
    truncated" does not say which)."""
    from PIL import Image

    try:
        with open(path, "rb") as fh, Image.open(fh) as img:
            return img.convert("RGB")
    except OSError as exc:
        raise TwaError(f"{path}: not a readable image ({first_line(exc)})") from exc


def _folders(data_dir: str | None) -> tuple[Path, Path]:
    """(train/, the held-out folder scored as the test split): test/, else val/ (ImageNet's layout)."""
    if data_dir is None:
        raise TwaError("--data imagefolder needs --data-dir, a folder with train/ and val/ (or test/)")
    root = Path(data_dir)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise TwaError(f"--data-dir {root}: expected train/ and val/ (or test/) sub-folders of class folders")
    return train_dir, test_dir


def _val_folder(data_dir: str | None) -> Path | None:
    """val/, when test/ is there too: the validation split (with test/ alone or val/ alone there is none)."""
    root = Path(data_dir or "")
    return root / "val" if (root / "val").is_dir() and (root / "test").is_dir() else None


def has_val_folder(data_dir: Any) -> bool:
    """Whether an image folder holds its own validation split (`_val_folder`), seen before any image is read."""
    return isinstance(data_dir, str) and _val_folder(data_dir) is not None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_names(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    """The images of one class folder, in the order torchvision's ImageFolder takes them."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_shape(data_dir: str | None) -> tuple[int, int, int]:
    """(classes, channels, width) of an image folder from its listing and one image; its held-out classes
    must be classes of train/."""
    from PIL import Image

    train_dir, test_dir = _folders(data_dir)
    classes = _class_names(train_dir)
    for held in (test_dir, _val_folder(data_dir)):
        unknown = sorted(set(_class_names(held)) - set(classes)) if held else []
        if unknown:
            raise TwaError(f"{held / unknown[0]}: a class that {train_dir} does not have; "
                           "the held-out classes must be classes of train/")
    first = next((p for c in classes for p in _images(train_dir / c)), None)
    if first is None:
        raise TwaError(f"{train_dir}: no images found")
    try:
        with Image.open(first) as img:
            return len(classes), len(img.getbands()), img.size[0]
    except OSError as exc:
        raise TwaError(f"{first}: not a readable image ({first_line(exc)})") from exc


class ImageTensors(Dataset):
    """Small images held in memory as uint8 (N, C, H, W), normalized (and augmented) a whole batch at a time.

    The augmentation is the standard CIFAR one: a random crop of the image padded by 1/8 of its width, then a
    random horizontal flip. It draws from torch's global generator, which the training loop reseeds at every
    epoch, so a run's augmentation depends only on (seed, epoch).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, *, augment: bool = False):
        self.images = images
        self.targets = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], y[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.augment:
            x = random_crop_flip(x, self.images.shape[-1] // 8)
        return (x.float().div_(255.0) - self.mean) / self.std, self.targets[index]


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """A random crop (zero padding `pad`) and a random horizontal flip per image of a (B, C, H, W) batch."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    dx = torch.randint(0, 2 * pad + 1, (b, 1, 1))
    flip = torch.rand(b, 1, 1) < 0.5
    cols = torch.arange(w).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols)
    rows = dy + torch.arange(h).view(1, h, 1)
    out = padded[torch.arange(b).view(b, 1, 1), :, rows, dx + cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def decoded_folder(folder: Path, reference: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a class-folder tree as uint8 (N, C, H, W) plus labels, labelled by the class folders of
    `reference` (train/) when given. Decoded once per process for a folder as it is on disk."""
    ref = reference or folder
    return _decode(str(folder.resolve()), folder.stat().st_mtime_ns, str(ref.resolve()))


@lru_cache(maxsize=4)
def _decode(folder: str, mtime: int, reference: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    index = {name: i for i, name in enumerate(_class_names(Path(reference)))}
    samples = [(path, index[c]) for c in _class_names(Path(folder)) for path in _images(Path(folder) / c)]
    arrays = []
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img))
        except OSError as exc:  # a truncated or damaged image
            raise TwaError(f"{path}: not a readable image ({first_line(exc)})") from exc
    if not arrays:
        raise TwaError(f"{folder}: no images found")
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise TwaError(f"{folder}: images of different sizes {sorted(sizes)[:2]}; resize them to one size")
    stacked = torch.from_numpy(np.stack(arrays))
    images = stacked.unsqueeze(1) if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)
    return images.contiguous(), torch.tensor([label for _, label in samples], dtype=torch.long)


def _user_data(name: str, data_dir: str | None) -> Datasets:
    factory = import_callable(name, "--data")
    args = (data_dir,) if data_dir is not None else ()
    train, val, test = hook_splits(factory, name, args)
    try:
        x0, _ = train[0]
        x0 = torch.as_tensor(x0)
        labels = _labels(train)
    except Exception as exc:
        raise TwaError(f"--data {name}: its training set's items are not (image tensor, integer label) pairs "
                       f"({type(exc).__name__}: {first_line(exc)}); for other data use --task") from exc
    channels = int(x0.shape[0]) if x0.dim() == 3 else 1
    return Datasets(train, train, test, int(max(labels)) + 1, channels, int(x0.shape[-1]), val, val)


def _labels(dataset: Dataset) -> list[int]:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return list(map(int, targets))
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]
