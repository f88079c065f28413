"""The frozen OpenCLIP text encoder that conditions the UNet.

Only the text tower is built, from open_clip's own model configs (``ViT-H-14`` for SD 2.x), so a
354M-parameter text encoder does not drag a 630M-parameter vision tower along. Its parameter names are
those of open_clip's ``CLIP`` text path (``token_embedding``, ``positional_embedding``, ``transformer``,
``ln_final``, ``text_projection``), so a full open_clip checkpoint loads into it once ``visual.*`` is dropped.

Weights come from one of three places, in this order:

* ``state_dict``: tensors handed over in memory, used when rebuilding from a training checkpoint;
* ``weights_path``: a local open_clip checkpoint (full CLIP or text tower only, ``.safetensors`` or torch);
* ``pretrained``: an open_clip tag, downloaded through open_clip's normal path (HF hub or URL).

With none of them the tower is randomly initialised from ``seed``: a frozen random encoder still maps
each caption to a fixed, distinct embedding, which is enough for the CPU shapes default; the checkpoint
then stores the encoder's weights (see :func:`text_encoder_state`).
"""

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import open_clip
import torch
from open_clip.model import _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from ldm.checkpoints.io import read_checkpoint

logger = logging.getLogger(__name__)

LAYERS = ("last", "penultimate")
TOKEN_CACHE_SIZE = 65536
_NON_TEXT_KEYS = ("logit_scale", "logit_bias")
_TOWER_PREFIXES = ("text_tower.", "text.")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def text_state_dict_from_checkpoint(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keep the text-tower tensors of an open_clip checkpoint, in ``TextTransformer`` naming.

    Accepts a full ``CLIP`` state dict (``visual.*`` and the logit scale are dropped), a ``CustomTextCLIP``
    one (``text.*``), this encoder's own (``text_tower.*``), one saved from DDP (``module.*``), or a
    text-only one.
    """
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    for prefix in _TOWER_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state_dict.items() if not k.startswith("visual.") and k not in _NON_TEXT_KEYS}


def _load_checkpoint_file(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Text encoder weights_path does not exist: {path!r}")
    checkpoint = read_checkpoint(path)  # weights_only: a weights file never runs code
    state_dict = checkpoint.get("state_dict", checkpoint)
    return text_state_dict_from_checkpoint({k: v for k, v in state_dict.items() if isinstance(v, Tensor)})


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int, tokenizer_kwargs: tuple[tuple[str, Any], ...]) -> SimpleTokenizer:
    """Shared between encoders: building the BPE tables takes about a second."""
    return SimpleTokenizer(context_length=context_length, **dict(tokenizer_kwargs))


def _plain(value: Any) -> Any:
    """Nested mappings and sequences (e.g. Hydra's DictConfig) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _resolve_model_cfg(arch: str, model_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_cfg is None:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"Unknown open_clip architecture {arch!r}; known: {open_clip.list_models()}")
    model_cfg = _plain(model_cfg)
    if "text_cfg" not in model_cfg or "embed_dim" not in model_cfg:
        raise ValueError(
            "model_cfg must follow open_clip's model config layout, e.g. "
            "{'embed_dim': 64, 'text_cfg': {'width': 64, 'layers': 2, 'heads': 2, "
            "'context_length': 77, 'vocab_size': 49408}}"
        )
    text_cfg = dict(model_cfg["text_cfg"])
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{arch!r} uses a Hugging Face text model; only open_clip text transformers are supported")
    if text_cfg.get("embed_cls"):
        raise ValueError(f"{arch!r} appends a class token (CoCa); its token outputs are not SD-style embeddings")
    model_cfg["text_cfg"] = text_cfg
    return model_cfg


class OpenCLIPTextEncoder(nn.Module):
    """Frozen OpenCLIP text transformer: captions -> per-token embeddings ``(B, max_length, width)``.

    ``layer="penultimate"`` takes the output of the second-to-last residual block (SD 2.x),
    ``layer="last"`` the output of the last one. ``final_norm`` applies ``ln_final`` to it: SD 2.x does
    so for the penultimate layer as well (Stability's ``FrozenOpenCLIPEmbedder`` runs ``ln_final`` after
    stopping one block early); SDXL's OpenCLIP-bigG embedder does not (``final_norm=False``).

    ``pad_token_id`` fills the positions after the end-of-text token: None keeps open_clip's 0 (SD 2.x);
    SD 1.x's CLIP tokenizer pads with the end-of-text token itself, 49407. The positions after the
    caption are context rows the UNet attends to, so a model trained with one padding sees another
    context under the other.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        weights_path: str | None = None,
        layer: str = "penultimate",
        max_length: int = 77,
        model_cfg: Mapping[str, Any] | None = None,
        final_norm: bool = True,
        seed: int = 0,
        state_dict: Mapping[str, Tensor] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if model_cfg is not None and pretrained is not None and weights_path is None and state_dict is None:
            raise ValueError(
                "A pretrained tag names weights for a named arch; with a custom model_cfg pass "
                "weights_path, or pretrained=None for a random encoder"
            )
        resolved_cfg = _resolve_model_cfg(arch, model_cfg)
        text_cfg = resolved_cfg["text_cfg"]
        context_length = text_cfg.get("context_length", 77)
        if max_length != context_length:
            raise ValueError(
                f"max_length={max_length} must equal the text tower's context_length={context_length}: "
                "the positional embedding and causal mask are sized for it"
            )
        if layer == "penultimate" and text_cfg["layers"] < 2:
            raise ValueError("layer='penultimate' needs a text tower with at least 2 blocks")

        self.config: dict[str, Any] = {
            "arch": arch,
            "pretrained": pretrained,
            "weights_path": weights_path,
            "layer": layer,
            "max_length": max_length,
            "model_cfg": None if model_cfg is None else resolved_cfg,
            "final_norm": final_norm,
            "seed": seed,
        }
        if pad_token_id is not None:  # absent from configs that pad with 0, as before the option existed
            self.config["pad_token_id"] = pad_token_id
        self.pad_token_id = pad_token_id
        self.layer = layer
        self.final_norm = final_norm
        self.max_length = max_length
        self.weights_file: str | None = None

        pretrained_cfg = self._pretrained_cfg(arch, pretrained) if model_cfg is None else {}
        weights, source = self._fetch_weights(arch, pretrained, pretrained_cfg, weights_path, state_dict)
        quick_gelu = bool(resolved_cfg.get("quick_gelu", False) or pretrained_cfg.get("quick_gelu", False))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.text_tower = _build_text_tower(resolved_cfg["embed_dim"], text_cfg, quick_gelu=quick_gelu)
        self.tokenizer = _tokenizer(max_length, tuple(sorted(text_cfg.get("tokenizer_kwargs", {}).items())))
        self._token_rows: dict[str, Tensor] = {}
        if weights is None:
            logger.warning(
                "The text encoder is RANDOMLY INITIALISED (arch=%s, seed=%d, no pretrained tag or weights_path): "
                "captions map to fixed but meaningless embeddings.",
                arch if model_cfg is None else "custom model_cfg",
                seed,
            )
        else:
            self._load_text_state(weights, source)
        self.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _pretrained_cfg(arch: str, pretrained: str | None) -> dict[str, Any]:
        if pretrained is None:
            return {}
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not cfg:
            raise ValueError(
                f"{pretrained!r} is not an open_clip pretrained tag for {arch!r}; "
                f"known tags: {open_clip.list_pretrained_tags_by_model(arch)}. "
                "For a local file use weights_path."
            )
        return cfg

    def _fetch_weights(
        self,
        arch: str,
        pretrained: str | None,
        pretrained_cfg: Mapping[str, Any],
        weights_path: str | None,
        state_dict: Mapping[str, Tensor] | None,
    ) -> tuple[dict[str, Tensor] | None, str]:
        """Text-tower weights and where they came from, fetched before the (slow) tower is built."""
        if state_dict is not None:
            return text_state_dict_from_checkpoint(state_dict), "the state_dict argument"
        if weights_path is not None:
            self.weights_file = weights_path
        elif pretrained is not None:
            self.weights_file = self._download(arch, pretrained, pretrained_cfg)
        else:
            return None, "random init"
        return _load_checkpoint_file(self.weights_file), self.weights_file

    @staticmethod
    def _download(arch: str, pretrained: str, pretrained_cfg: Mapping[str, Any]) -> str:
        try:
            path = open_clip.download_pretrained(dict(pretrained_cfg))
        except Exception as error:
            raise RuntimeError(
                f"Could not fetch the OpenCLIP weights {arch}/{pretrained} "
                f"(hub {pretrained_cfg.get('hf_hub') or pretrained_cfg.get('url')!r}): {error}\n"
                "Without internet access, download them elsewhere and set the text encoder's "
                "weights_path to the local file: an open_clip checkpoint (e.g. open_clip_pytorch_model.bin "
                "or open_clip_model.safetensors) or a .safetensors of the text tower alone."
            ) from error
        if not path:
            raise RuntimeError(f"open_clip returned no file for {arch}/{pretrained}; set weights_path instead")
        return path

    def _load_text_state(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        missing, unexpected = self.text_tower.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"Text encoder weights from {source} do not match the {self.config['arch']} text tower: "
                f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )

    @property
    def output_dim(self) -> int:
        """Width of each token embedding: the UNet's ``context_dim``."""
        return self.text_tower.transformer.width

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        """Stays in eval mode whatever is asked: the encoder is frozen."""
        return super().train(False)

    def tokenize(self, captions: list[str]) -> Tensor:
        """BPE token ids ``(B, max_length)``: start token, caption (truncated), end token, padding (0, or
        ``pad_token_id``).

        Rows are kept per caption (up to TOKEN_CACHE_SIZE captions, then the cache starts over): a dataset
        with a finite set of captions, and the empty unconditional caption, is tokenised once, not at every
        step (tokenising 32 captions cost ~16 ms, a sixth of a small model's GPU step)."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._token_rows))
        if len(self._token_rows) + len(missing) > TOKEN_CACHE_SIZE:
            self._token_rows.clear()
            missing = list(dict.fromkeys(captions))
        if missing:
            self._token_rows.update(zip(missing, self._pad(self.tokenizer(missing))))
        return torch.stack([self._token_rows[c] for c in captions])

    def _pad(self, tokens: Tensor) -> Tensor:
        """Rows of open_clip's tokenizer (zeros after the end token) padded with ``pad_token_id``."""
        if self.pad_token_id is None:
            return tokens
        end = tokens.argmax(dim=-1, keepdim=True)  # the end-of-text token has the largest id: its first position
        after = torch.arange(tokens.shape[-1]).unsqueeze(0) > end
        return tokens.masked_fill(after, self.pad_token_id)

    @torch.no_grad()
    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids ``(B, max_length)`` -> embeddings ``(B, max_length, width)`` from the chosen layer."""
        tokens = tokens.to(self.text_tower.token_embedding.weight.device)
        block = -2 if self.layer == "penultimate" else -1
        hidden = self.text_tower.forward_intermediates(
            tokens, indices=[block], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )["text_intermediates"][0]
        return self.text_tower.ln_final(hidden) if self.final_norm else hidden

    def forward(self, captions: list[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(captions))

    @functools.cached_property
    def weights_sha256(self) -> str | None:
        """SHA-256 of the file the weights came from, hashed once (a full ViT-H-14 checkpoint is 3.9 GB)."""
        return None if self.weights_file is None else sha256_file(self.weights_file)

    def text_tower_state_dict(self) -> dict[str, Tensor]:
        """The tower's tensors under open_clip's ``CLIP`` text names, ready for ``safetensors.save_file``."""
        return {k: v.detach().contiguous() for k, v in self.text_tower.state_dict().items()}


def text_encoder_state(encoder: OpenCLIPTextEncoder, include_weights: bool | None = None) -> dict[str, Any]:
    """What a checkpoint stores to rebuild ``encoder`` exactly, without the original YAML.

    ``config`` always; then either the weights themselves (``state_dict``) or the file they came from
    (``weights_file`` + ``weights_sha256``, checked on rebuild). By default the weights are stored only when
    there is no file to point at (a random or in-memory encoder): ViT-H-14's tower is 1.35 GB.
    """
    if include_weights is None:
        include_weights = encoder.weights_file is None
    state: dict[str, Any] = {"config": dict(encoder.config)}
    if include_weights:
        state["state_dict"] = encoder.text_tower_state_dict()
    else:
        if encoder.weights_file is None:
            raise ValueError("This encoder has no weights file to reference; use include_weights=True")
        state["weights_file"] = encoder.weights_file
        state["weights_sha256"] = encoder.weights_sha256
    return state


def text_encoder_from_state(state: Mapping[str, Any]) -> OpenCLIPTextEncoder:
    """Rebuild the encoder saved by :func:`text_encoder_state`, refusing weights that changed since.

    A recorded file that is gone is fetched again through the pretrained tag when there is one.
    """
    config = dict(state["config"])
    if "state_dict" in state:
        return OpenCLIPTextEncoder(**config, state_dict=state["state_dict"])
    weights_file, expected = state["weights_file"], state["weights_sha256"]
    if os.path.isfile(weights_file):
        _check_sha256(weights_file, expected)
        return OpenCLIPTextEncoder(**{**config, "weights_path": weights_file})
    if config["weights_path"] is not None or config["pretrained"] is None:
        raise FileNotFoundError(f"Text encoder weights file {weights_file!r} recorded in the checkpoint is missing")
    encoder = OpenCLIPTextEncoder(**config)
    _check_sha256(encoder.weights_file, expected)
    return encoder


def _check_sha256(path: str, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(
            f"Text encoder weights {path!r} differ from those the checkpoint was trained with "
            f"(sha256 {actual}, expected {expected})"
        )
