"""The model registry: the paper's architectures, small ones for CPU work, torchvision's and a user's own.

An architecture is described by a small JSON-able dict, `{"name": ..., "kwargs": {...}}`, stored in every
checkpoint's metadata so later commands rebuild the network without being told `--model` again. A name of
the registry (or `torchvision:<name>`) is looked up in a table; a `package.module:callable` is the user's
code and is built only when the user named it (`allow_code`), never because a file says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from twa_cli.errors import TwaError
from twa_cli.tasks.hooks import accepted_kwargs, call_hook, import_callable, is_code_name

Builder = Callable[..., nn.Module]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (widths 32/64/128) and a linear head: CPU-size, BatchNorm like the paper's nets."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """A multilayer perceptron on flattened inputs (no BatchNorm), for tabular data and tests."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for _ in range(depth):
            layers += [nn.Linear(prev, hidden), nn.ReLU(inplace=True)]
            prev = hidden
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers; n=3 is ResNet-20, about 0.27M parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        cin = width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks_per_stage):
                stages.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class _PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with bottlenecks for CIFAR (depth 164: 18 blocks per stage), as in the paper."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 164):
        super().__init__()
        if (depth - 2) % 9:
            raise TwaError(f"preact-resnet depth must be 9n+2 (got {depth})")
        n = (depth - 2) // 9
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(_PreActBottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * _PreActBottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs, with the SWA paper's three-layer classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# The only arguments a torchvision or timm model is built with: its size. Anything else a description might pass
# (torchvision's `weights_backbone`, timm's `pretrained_cfg_overlay`) could make the library fetch weights.
SIZE_ARGUMENTS = frozenset({"num_classes", "in_channels", "image_size"})


def _torchvision(name: str) -> Builder:
    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        import torchvision

        if in_channels != 3:
            raise TwaError(f"torchvision model '{name}' expects 3 input channels, the data has {in_channels}")
        try:
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except ValueError as exc:
            raise TwaError(f"unknown torchvision model '{name}' ({exc})") from exc

    return build


def _timm(name: str) -> Builder:
    """A timm model by its registry name, with random weights (`pretrained=False`: nothing is downloaded)."""

    def build(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
        try:
            import timm
        except ImportError as exc:
            raise TwaError(f"--model timm:{name} needs timm: pip install 'twa-cli[timm]'") from exc
        if not timm.is_model(name):
            raise TwaError(f"unknown timm model '{name}' (timm.list_models() names them)")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    return build


def timm_knows(name: str) -> bool:
    """Whether timm is installed and has a model of this name."""
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name))


def timm_classifier(name: str) -> str | None:
    """The name of a timm model's classification layer (its `default_cfg['classifier']`), as the checkpoint
    names its weight `<classifier>.weight`."""
    if not timm_knows(name):
        raise TwaError(f"unknown timm model '{name}' (timm.list_models() names them; pip install timm)")
    import timm

    model = timm.create_model(name, pretrained=False)
    return getattr(model, "default_cfg", {}).get("classifier")


def _mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, **kwargs: Any) -> nn.Module:
    return MLP(num_classes, in_features=in_channels * image_size * image_size, **kwargs)


def _drop_image_size(cls: Callable[..., nn.Module]) -> Builder:
    def build(image_size: int | None = None, **kwargs: Any) -> nn.Module:
        return cls(**kwargs)

    build.__doc__ = cls.__doc__
    return build


MODELS: dict[str, Builder] = {
    "small-cnn": _drop_image_size(SmallCNN),
    "resnet20": _drop_image_size(CifarResNet),
    "mlp": _mlp,
    "vgg16-bn": _drop_image_size(VGG16BN),
    "preact-resnet164": _drop_image_size(PreActResNet),
    "resnet18": _drop_image_size(_torchvision("resnet18")),
    "resnet50": _drop_image_size(_torchvision("resnet50")),
}


def known_models() -> str:
    return ", ".join(MODELS) + ", torchvision:<name>, timm:<name>, hf:AutoModelFor..., package.module:callable"


def model_spec(name: str, num_classes: int, in_channels: int, image_size: int, **extra: Any) -> dict[str, Any]:
    """The JSON description of an architecture for the given data set."""
    kwargs = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, **extra}
    return {"name": name, "kwargs": kwargs}


def build_model(spec: Mapping[str, Any], *, allow_code: bool = False, source: str | None = None) -> nn.Module:
    """Instantiate the architecture a spec describes. `allow_code`: the user named this spec, so a
    `package.module:callable` in it may be imported; `source`: the file the spec was read from, for messages."""
    where = f"{source}: " if source else ""
    valid = isinstance(spec, Mapping) and isinstance(spec.get("name"), str)
    if not (valid and isinstance(spec.get("kwargs", {}), dict)):
        raise TwaError(f"{where}not an architecture description: "
                       f"{dict(spec) if isinstance(spec, Mapping) else spec!r}")
    name, kwargs = spec["name"], dict(spec.get("kwargs", {}))
    if name in MODELS:
        builder = MODELS[name]
    elif name.startswith(("torchvision:", "timm:")):
        unknown = sorted(set(kwargs) - SIZE_ARGUMENTS)
        if unknown:
            raise TwaError(f"{where}the model '{name}' is described with '{unknown[0]}'; a {name.split(':')[0]} model "
                           f"is built from its size alone ({', '.join(sorted(SIZE_ARGUMENTS))})")
        kwargs.pop("image_size", None)
        builder = (_torchvision if name.startswith("torchvision:") else _timm)(name.split(":", 1)[1])
    elif is_code_name(name):
        if not allow_code:
            raise TwaError(f"{where}the model '{name}' is Python code named by a file, not by you; pass --model "
                           f"{name} to run it")
        return _call_user_builder(name, kwargs)
    else:
        raise TwaError(f"{where}unknown model '{name}'; known: {known_models()}")
    try:
        return builder(**kwargs)
    except TwaError as exc:  # an unknown torchvision or timm name: the file that named it is the one to fix
        if where:
            raise TwaError(f"{where}{exc}") from exc
        raise
    except (TypeError, ValueError, RuntimeError) as exc:  # a damaged or hand-edited description
        raise TwaError(f"{where}model '{name}' cannot be built with {kwargs}: {exc}") from exc


def _call_user_builder(name: str, kwargs: dict[str, Any]) -> nn.Module:
    module = name.partition(":")[0]
    if module.split(".")[0] == "transformers":
        raise TwaError(f"--model {name}: a transformers model is built from its checkpoint's config.json: leave "
                       "--model out for a Hugging Face checkpoint folder, or pass --model hf:AutoModelFor... (or a "
                       "folder holding config.json)")
    if module.split(".")[0] == "timm":
        raise TwaError(f"--model {name}: a timm model is named --model timm:{name.partition(':')[2]}")
    builder = import_callable(name, "--model")
    model = call_hook(builder, name, "--model", "build a torch.nn.Module from keyword arguments such as num_classes",
                      **accepted_kwargs(builder, kwargs))
    if not isinstance(model, nn.Module):
        raise TwaError(f"--model {name}: returned {type(model).__name__}, not a torch.nn.Module")
    return model


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that TWA trains (buffers stay outside the subspace)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def tied_names(model: nn.Module) -> list[str]:
    """State-dict names that are a second name of a tensor already named (tied weights, as GPT-2's lm_head and
    its token embedding): files may leave them out, and loading the first name sets both."""
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    tied = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        # A model built on the meta device has no memory (every data_ptr is 0): there a tied weight is the
        # same parameter object under a second name.
        key = (id(tensor) if tensor.is_meta else tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            tied.append(name)
        else:
            seen[key] = name
    return tied


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to write: every tensor once (tied names left out, as Hugging Face writes its files)."""
    tied = set(tied_names(model))
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def check_fits(model: nn.Module, shapes: Mapping[str, Sequence[int]], source: str, *,
               optional: Sequence[str] | None = None) -> None:
    """The file's tensors are exactly the model's, shape for shape; else name the first mismatch. `optional`:
    tensors the file may leave out (default: the model's tied names)."""
    own = model.state_dict()
    optional = tied_names(model) if optional is None else optional
    for key, value in own.items():
        if key not in shapes:
            if key in optional:
                continue
            raise TwaError(f"{source}: has no tensor '{key}' that the model needs; does --model fit the checkpoint?")
        if tuple(shapes[key]) != tuple(value.shape):
            raise TwaError(
                f"{source}: '{key}' has shape {list(shapes[key])}, the model expects {list(value.shape)}; "
                "does --model fit the checkpoint?"
            )
    extra = [k for k in shapes if k not in own]
    if extra:
        raise TwaError(f"{source}: tensor '{extra[0]}' is not in the model; does --model fit the checkpoint?")


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state_dict, naming the first mismatch when the checkpoint does not fit the architecture (a tied
    name the file leaves out is set through the name it is tied to)."""
    check_fits(model, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    model.load_state_dict(dict(tensors), strict=False)
