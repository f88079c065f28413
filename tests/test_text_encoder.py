import hashlib
import logging
import os
import time

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from ldm.modules.text_encoder import (
    OpenCLIPTextEncoder,
    sha256_file,
    text_encoder_from_state,
    text_encoder_state,
    text_state_dict_from_checkpoint,
)

TINY_TEXT_CFG = {"width": 64, "layers": 3, "heads": 2, "context_length": 77, "vocab_size": 49408}
TINY_MODEL_CFG = {"embed_dim": 32, "text_cfg": TINY_TEXT_CFG}
TINY_VISION_CFG = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}
CAPTIONS = ["a red circle", "a small blue square in the top left corner", ""]


def tiny_encoder(**overrides) -> OpenCLIPTextEncoder:
    kwargs = {"arch": "tiny", "pretrained": None, "model_cfg": TINY_MODEL_CFG, **overrides}
    return OpenCLIPTextEncoder(**kwargs)


def tiny_open_clip_model() -> open_clip.CLIP:
    """open_clip's own full CLIP (vision + text) on the tiny text config: the reference implementation."""
    return open_clip.CLIP(embed_dim=32, vision_cfg=TINY_VISION_CFG, text_cfg=TINY_TEXT_CFG).eval()


def sd2_style_reference(clip: open_clip.CLIP, tokens: torch.Tensor, blocks_to_skip: int) -> torch.Tensor:
    """Stability's SD 2.x recipe: embed, run all but the last ``blocks_to_skip`` blocks, then ln_final."""
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for block in clip.transformer.resblocks[: len(clip.transformer.resblocks) - blocks_to_skip]:
        x = block(x, attn_mask=clip.attn_mask)
    return clip.ln_final(x)


def assert_close_across_implementations(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """fp32 outputs of one function computed by two implementations (open_clip's ``encode_text`` vs the text
    tower's ``forward_intermediates``: other attention paths and kernels, which also change with the batch
    size and the CPU). They agree to a few ulp per op, not bitwise: measured here up to 2.8e-6 on
    LayerNorm outputs of magnitude ~4 (tiny tower), 3.8e-6 for ViT-H-14. ``rtol`` bounds the large
    entries; for the entries near zero, where ``rtol`` alone fails, an ``atol`` scaled to the tensor's
    magnitude. Same implementation, same kernels and same input stay bit-exact (``torch.equal``) below."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.fixture
def clip_checkpoint(tmp_path) -> tuple[open_clip.CLIP, str]:
    clip = tiny_open_clip_model()
    path = str(tmp_path / "tiny_clip.pt")
    torch.save(clip.state_dict(), path)
    return clip, path


def test_tokenizer_produces_real_bpe_tokens() -> None:
    tokens = tiny_encoder().tokenize(["a red circle", "a blue circle"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, :5].tolist() == [49406, 320, 736, 7117, 49407]
    assert tokens[1, 2].item() != tokens[0, 2].item()
    assert tokens[0, 5:].eq(0).all()


def test_kept_token_rows_equal_fresh_tokenisation_also_when_the_cache_starts_over(monkeypatch) -> None:
    import ldm.modules.text_encoder as text_encoder

    encoder = tiny_encoder()
    batches = [CAPTIONS, ["a red circle", "a green triangle", "a red circle"], CAPTIONS[::-1], ["x y", "a red circle"]]
    monkeypatch.setattr(text_encoder, "TOKEN_CACHE_SIZE", 4)
    for batch in batches:
        assert torch.equal(encoder.tokenize(batch), encoder.tokenizer(batch))
        assert len(encoder._token_rows) <= 4
    rows = encoder.tokenize(["a red circle"])
    rows.zero_()
    assert encoder.tokenize(["a red circle"])[0, 0].item() == 49406, "a caller's tensor must not alias the cache"


def test_long_captions_are_truncated_with_an_end_token() -> None:
    tokens = tiny_encoder().tokenize(["circle " * 200])
    assert tokens.shape == (1, 77)
    assert tokens[0, -1].item() == 49407


def test_last_layer_equals_open_clip_encode_text_tokens(clip_checkpoint) -> None:
    clip, path = clip_checkpoint
    encoder = tiny_encoder(weights_path=path, layer="last")
    tokens = encoder.tokenize(CAPTIONS)

    captured = {}
    hook = clip.ln_final.register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    with torch.no_grad():
        pooled = clip.encode_text(tokens)
    hook.remove()

    ours = encoder(CAPTIONS)
    assert_close_across_implementations(ours, captured["tokens"])
    end_positions = tokens.argmax(dim=-1)
    ours_pooled = ours[torch.arange(len(CAPTIONS)), end_positions] @ encoder.text_tower.text_projection
    assert_close_across_implementations(ours_pooled, pooled)


def test_penultimate_layer_follows_stable_diffusion_2(clip_checkpoint) -> None:
    clip, path = clip_checkpoint
    penultimate = tiny_encoder(weights_path=path, layer="penultimate")
    last = tiny_encoder(weights_path=path, layer="last")
    tokens = penultimate.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = sd2_style_reference(clip, tokens, blocks_to_skip=1)

    ours = penultimate(CAPTIONS)
    assert_close_across_implementations(ours, reference)
    assert (ours - last(CAPTIONS)).abs().max() > 0.1


def test_penultimate_without_final_norm_is_the_raw_block_output(clip_checkpoint) -> None:
    clip, path = clip_checkpoint
    raw = tiny_encoder(weights_path=path, final_norm=False)(CAPTIONS)
    normed = clip.ln_final(raw)
    torch.testing.assert_close(normed, tiny_encoder(weights_path=path)(CAPTIONS))
    assert not torch.allclose(raw, normed, atol=1e-2)


def test_safetensors_weights_reload_bit_identically(tmp_path) -> None:
    original = tiny_encoder(seed=7)
    path = str(tmp_path / "text_tower.safetensors")
    save_file(original.text_tower_state_dict(), path)

    reloaded = tiny_encoder(weights_path=path, seed=8)
    assert torch.equal(reloaded(CAPTIONS), original(CAPTIONS))
    assert not torch.allclose(tiny_encoder(seed=8)(CAPTIONS), original(CAPTIONS))


def test_state_dict_argument_accepts_prefixed_layouts(clip_checkpoint) -> None:
    clip, path = clip_checkpoint
    expected = tiny_encoder(weights_path=path)(CAPTIONS)
    ddp_clip = {f"module.{k}": v for k, v in clip.state_dict().items()}
    assert torch.equal(tiny_encoder(state_dict=ddp_clip, seed=9)(CAPTIONS), expected)
    own = tiny_encoder(weights_path=path).state_dict()
    assert all(k.startswith("text_tower.") for k in own)
    assert torch.equal(tiny_encoder(state_dict=own, seed=9)(CAPTIONS), expected)


def test_random_init_is_reproducible_from_its_seed_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_encoder(seed=3)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(first(CAPTIONS), tiny_encoder(seed=3)(CAPTIONS))


def test_random_init_logs_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.modules.text_encoder"):
        tiny_encoder()
    assert "RANDOMLY INITIALISED" in caplog.text


def test_encoder_is_frozen_and_stays_in_eval() -> None:
    encoder = tiny_encoder()
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    with torch.enable_grad():
        assert not encoder(CAPTIONS).requires_grad


def test_distinct_captions_give_distinct_embeddings() -> None:
    out = tiny_encoder()(["a red circle", "a blue circle", "a red circle"])
    assert out.shape == (3, 77, 64)
    assert torch.equal(out[0], out[2])
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        tiny_encoder(weights_path=missing)


def test_mismatched_weights_are_rejected(tmp_path) -> None:
    wider = OpenCLIPTextEncoder(
        arch="wide", pretrained=None, model_cfg={"embed_dim": 32, "text_cfg": {**TINY_TEXT_CFG, "width": 128}}
    )
    path = str(tmp_path / "wider.safetensors")
    save_file(wider.text_tower_state_dict(), path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        tiny_encoder(weights_path=path)

    incomplete = {k: v for k, v in tiny_encoder().text_tower_state_dict().items() if k != "ln_final.weight"}
    save_file(incomplete, path)
    with pytest.raises(RuntimeError, match="ln_final.weight"):
        tiny_encoder(weights_path=path)


def test_unreachable_pretrained_tag_fails_fast_pointing_at_weights_path() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="weights_path") as error:
        OpenCLIPTextEncoder(arch="ViT-H-14", pretrained="laion2b_s32b_b79k")
    assert time.perf_counter() - start < 5.0
    assert "Could not fetch" in str(error.value)


def test_unknown_pretrained_tag_lists_known_tags() -> None:
    with pytest.raises(ValueError, match="laion2b_s32b_b79k"):
        OpenCLIPTextEncoder(arch="ViT-H-14", pretrained="no_such_tag")


def test_state_with_weights_rebuilds_identically(tmp_path) -> None:
    encoder = tiny_encoder(seed=5, layer="last")
    state = text_encoder_state(encoder)
    assert "state_dict" in state and "weights_sha256" not in state
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)

    rebuilt = text_encoder_from_state(torch.load(path, weights_only=True))
    assert rebuilt.layer == "last"
    assert torch.equal(rebuilt(CAPTIONS), encoder(CAPTIONS))


def test_state_referencing_a_file_checks_its_hash(tmp_path, clip_checkpoint) -> None:
    _, path = clip_checkpoint
    encoder = tiny_encoder(weights_path=path)
    state = text_encoder_state(encoder)
    assert "state_dict" not in state
    assert state["weights_sha256"] == sha256_file(path)
    assert torch.equal(text_encoder_from_state(state)(CAPTIONS), encoder(CAPTIONS))

    torch.save(tiny_open_clip_model().state_dict(), path)
    with pytest.raises(ValueError, match="sha256"):
        text_encoder_from_state(state)
    os.remove(path)
    with pytest.raises(FileNotFoundError):
        text_encoder_from_state(state)


def test_sha256_file_matches_hashlib_across_chunks(tmp_path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 40 + b"tail")
    assert sha256_file(path, chunk_bytes=1000) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_config_instantiates_through_hydra(repo_root) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(repo_root, "configs/text_encoder/tiny.yaml"))
    encoder = instantiate(cfg)
    assert isinstance(encoder, OpenCLIPTextEncoder)
    assert encoder.output_dim == cfg.model_cfg.text_cfg.width
    assert isinstance(encoder.config["model_cfg"]["text_cfg"], dict)
    rebuilt = text_encoder_from_state(text_encoder_state(encoder))
    assert torch.equal(rebuilt(["a red circle"]), encoder(["a red circle"]))


@pytest.mark.parametrize(
    "name, arch, width", [("openclip_vit_h14", "ViT-H-14", 1024), ("openclip_vit_l14", "ViT-L-14", 768)]
)
def test_named_configs_point_at_open_clip_architectures(repo_root, name, arch, width) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(repo_root, f"configs/text_encoder/{name}.yaml"))
    assert cfg._target_ == "ldm.modules.text_encoder.OpenCLIPTextEncoder"
    assert cfg.arch == arch
    assert open_clip.get_model_config(arch)["text_cfg"]["width"] == width
    assert cfg.pretrained in open_clip.list_pretrained_tags_by_model(arch)


@pytest.mark.slow
def test_vit_h14_text_tower_matches_open_clip_create_model() -> None:
    start = time.perf_counter()
    encoder = OpenCLIPTextEncoder(arch="ViT-H-14", pretrained=None, layer="last")
    build_seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in encoder.parameters())
    print(f"ViT-H-14 text tower: {n_params:,} parameters, built in {build_seconds:.1f} s")
    assert encoder.output_dim == 1024
    assert 350e6 < n_params < 360e6

    full = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    encoder.text_tower.load_state_dict(text_state_dict_from_checkpoint(full.state_dict()), strict=True)
    tokens = encoder.tokenize(["a red circle"])
    captured = {}
    full.ln_final.register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    with torch.no_grad():
        full.encode_text(tokens)
    assert_close_across_implementations(encoder.encode_tokens(tokens), captured["tokens"])
