"""The one home of checkpoint files: safe reading, atomic writing, stage checks, Stable Diffusion
single files (`sd_single_file`: SD 1.x / 2.x in and out, all three networks), rebuilding networks
from our checkpoints, and (in `ldm.checkpoints.diffusers`, which needs diffusers) the export to
diffusers. Nothing here imports Lightning."""

from ldm.checkpoints.io import (
    CheckpointNotFoundError,
    UnsafeCheckpointError,
    atomic_save,
    previous_path_for,
    read_checkpoint,
    read_safetensors,
    read_state_dict,
    state_dict_sha256,
    sub_state_dict,
    temp_path_for,
    verify_checkpoint,
)
from ldm.checkpoints.models import autoencoder_from_checkpoint, load_autoencoder
from ldm.checkpoints.resume import LAST, find_resume_checkpoint, resume_candidates
from ldm.checkpoints.sd_single_file import StableDiffusionFile, is_sd_checkpoint, read_sd_file, save_sd_file
from ldm.checkpoints.stable_diffusion import SD_PREFIXES, load_sd_state_dict
from ldm.checkpoints.stages import checkpoint_stage, require_stage
from ldm.errors import CheckpointError, CheckpointStageError

__all__ = [
    "LAST",
    "SD_PREFIXES",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointStageError",
    "StableDiffusionFile",
    "UnsafeCheckpointError",
    "atomic_save",
    "autoencoder_from_checkpoint",
    "checkpoint_stage",
    "find_resume_checkpoint",
    "is_sd_checkpoint",
    "load_autoencoder",
    "load_sd_state_dict",
    "previous_path_for",
    "read_checkpoint",
    "read_safetensors",
    "read_sd_file",
    "read_state_dict",
    "require_stage",
    "resume_candidates",
    "save_sd_file",
    "state_dict_sha256",
    "sub_state_dict",
    "temp_path_for",
    "verify_checkpoint",
]
