"""From a Config to the parts of a run: device, precision, the fast paths (each with why it is on or off), the
networks, the loader (fastdino.run_record says what ran). The Trainer only runs steps with them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastdino.config import Config
from fastdino.data.datasets import ImageFolderDataset
from fastdino.distributed import DistributedContext
from fastdino.models import DINOHead, MultiCropWrapper, build_vit, xformers_usable
from fastdino.models.attention import torch_varlen_usable
from fastdino.preflight import bf16_supported, check_device, check_fast_paths, check_precision, uses_cuda


@dataclass
class FastPaths:
    """The fast paths actually in use for this run, each resolved from its config switch and the device."""

    fused_loss: bool
    fused_ema: bool
    packed: bool
    efficient_drop_path: bool
    fused_adamw: bool
    sync_free_clip: bool
    compile: bool
    dali: bool
    gpu_decode: bool
    reasons: dict[str, str] = field(default_factory=dict)  # why each path is on or off, for the start-up lines


def resolve_device(config: Config) -> torch.device:
    """CUDA when present unless device=cpu; what the machine lacks is refused by fastdino.preflight's rules."""
    check_device(config)
    if not uses_cuda(config):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # setting -> autocast dtype


def precision_name(dtype: torch.dtype) -> str:
    """The `precision` setting an autocast dtype stands for."""
    return next(name for name, candidate in PRECISIONS.items() if candidate == dtype)


def resolve_precision(config: Config, device: torch.device) -> torch.dtype:
    """The autocast dtype: by default bf16 on CUDA (fp16 on GPUs without bf16), fp32 (no autocast) on CPU."""
    check_precision(config, device)
    choice = config.precision
    if choice == "auto":
        choice = ("bf16" if bf16_supported(device) else "fp16") if device.type == "cuda" else "fp32"
    return PRECISIONS[choice]


def _switch(value: bool | str, available: bool, needs: str) -> tuple[bool, str]:
    """(on, why): `auto` follows what the device offers; true or false is the user's."""
    if value != "auto":
        return bool(value), f"set to {str(bool(value)).lower()}"
    return available, f"auto: {'has' if available else 'needs'} {needs}"


def resolve_fast_paths(config: Config, device: torch.device) -> FastPaths:
    """`auto` turns a fast path on where the device supports it (CUDA, and the library where one is needed); a path
    forced on where it cannot run is refused by fastdino.preflight's rules."""
    check_fast_paths(config, device)
    cuda = device.type == "cuda"
    fast = config.fast
    switches = {
        "fused_loss": _switch(fast.fused_loss, cuda, "CUDA"),
        "fused_ema": _switch(fast.fused_ema, cuda, "CUDA"),
        "packed": _switch(fast.packed, cuda and (xformers_usable() or torch_varlen_usable(device.index or 0)),
                          "CUDA with xformers or varlen flash attention"),
        "efficient_drop_path": _switch(fast.efficient_drop_path, cuda, "CUDA"),
        "fused_adamw": _switch(fast.fused_adamw, cuda, "CUDA"),
        "sync_free_clip": _switch(fast.sync_free_clip, True, "nothing"),
        "compile": _switch(fast.compile, False, "to be asked for"),
    }
    loader = config.data.loader
    dali = loader == "dali" or (loader == "auto" and cuda and _dali_installed())
    gpu_decode = loader == "gpu_decode" or (loader == "auto" and cuda and not dali)
    chosen = "dali" if dali else "gpu_decode" if gpu_decode else "torch"
    why_loader = f"set to {loader}" if loader != "auto" else \
        f"auto: {'CUDA, DALI installed' if dali else 'CUDA, no DALI' if gpu_decode else 'no CUDA'}"
    reasons = {name: f"{'on' if on else 'off'} ({why})" for name, (on, why) in switches.items()}
    reasons["data.loader"] = f"{chosen} ({why_loader})"
    return FastPaths(**{name: on for name, (on, _) in switches.items()}, dali=dali, gpu_decode=gpu_decode,
                     reasons=reasons)


def _dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def build_backbone(
    config: Config, drop_path_rate: float, efficient_drop_path: bool = False, compile_blocks: bool = False
) -> torch.nn.Module:
    """The ViT the config describes (the student gets stochastic depth, the teacher none)."""
    model = config.model
    extra = {"depth": model.depth} if model.depth is not None else {}
    return build_vit(
        model.arch,
        patch_size=model.patch_size,
        drop_path_rate=drop_path_rate,
        attention=model.attention,
        img_size=model.pos_embed_size,
        efficient_drop_path=efficient_drop_path,
        compile_blocks=compile_blocks,
        **extra,
    )


def build_networks(config: Config, fast: FastPaths) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher: same architecture and the same starting weights; the teacher never gets gradients."""
    model = config.model

    def network(drop_path_rate: float, norm_last_layer: bool) -> MultiCropWrapper:
        backbone = build_backbone(config, drop_path_rate, fast.efficient_drop_path, fast.compile)
        head = DINOHead(
            backbone.embed_dim,
            model.out_dim,
            use_bn=model.use_bn_in_head,
            norm_last_layer=norm_last_layer,
            nlayers=model.head_nlayers,
            hidden_dim=model.head_hidden_dim,
            bottleneck_dim=model.head_bottleneck_dim,
        )
        return MultiCropWrapper(backbone, head, packed=fast.packed)

    student = network(model.drop_path_rate, model.norm_last_layer)
    teacher = network(0.0, True)
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    return student, teacher


def build_loader(
    config: Config, fast: FastPaths, ctx: DistributedContext, device: torch.device, dtype: torch.dtype = torch.float32
):
    """The multi-crop loader: DALI or torchvision's GPU decode when on (crops come out on the device in `dtype`),
    else torchvision transforms in DataLoader workers. All three follow one recipe, built from the data settings."""
    from fastdino.data.recipe import MultiCropRecipe

    data = config.data
    recipe = MultiCropRecipe.from_settings(
        data.global_crops_scale,
        data.local_crops_scale,
        data.local_crops_number,
        data.global_crop_size,
        data.local_crop_size,
    )
    if fast.gpu_decode or fast.dali:
        if fast.gpu_decode:
            from fastdino.data.gpu_decode import GpuDecodeMultiCropLoader as DeviceLoader
        else:
            from fastdino.data.dali import DaliMultiCropLoader as DeviceLoader
        return DeviceLoader(
            data.path,
            batch_size=data.batch_size_per_gpu,
            recipe=recipe,
            num_threads=max(1, data.num_workers),
            seed=config.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=device,
            dtype=dtype,
        )
    from fastdino.data.augment import DataAugmentationDINO
    from fastdino.data.torch_loader import MultiCropLoader

    dataset = ImageFolderDataset(data.path, transform=DataAugmentationDINO(recipe=recipe))
    return MultiCropLoader(
        dataset,
        batch_size=data.batch_size_per_gpu,
        num_workers=data.num_workers,
        seed=config.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
