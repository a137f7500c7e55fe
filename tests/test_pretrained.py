"""Weights in and out: mamba_ssm checkpoints, and our own exported folders."""
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from model import ConfigError, MemMambaLM, build_model, load_pretrained, pretrained, save_pretrained
from model.mamba_import import config_from_mamba_ssm, load_mamba_ssm_state_dict, main as import_main
from tests.reference import mamba_lm_reference

HF_CONFIG = {"d_model": 48, "n_layer": 3, "vocab_size": 101, "ssm_cfg": {"d_state": 8},
             "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
             "pad_vocab_size_multiple": 8}


def random_mamba_ssm_state_dict(d_model=48, n_layer=3, vocab=104, d_state=8, d_conv=4, expand=2, seed=0):
    """Random weights with the names and shapes of mamba_ssm's MambaLMHeadModel."""
    g = torch.Generator().manual_seed(seed)
    E, R = expand * d_model, -(-d_model // 16)
    shapes = {"in_proj.weight": (2 * E, d_model), "conv1d.weight": (E, 1, d_conv), "conv1d.bias": (E,),
              "x_proj.weight": (R + 2 * d_state, E), "dt_proj.weight": (E, R), "dt_proj.bias": (E,),
              "out_proj.weight": (d_model, E)}
    sd = {"backbone.embedding.weight": torch.randn(vocab, d_model, generator=g) * 0.1,
          "backbone.norm_f.weight": 1 + 0.1 * torch.randn(d_model, generator=g)}
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        for name, shape in shapes.items():
            sd[p + "mixer." + name] = torch.randn(shape, generator=g) * 0.2
        sd[p + "mixer.A_log"] = torch.log(torch.rand(E, d_state, generator=g) * 4 + 0.5)
        sd[p + "mixer.D"] = torch.randn(E, generator=g)
        sd[p + "norm.weight"] = 1 + 0.1 * torch.randn(d_model, generator=g)
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    return sd


def test_mamba_ssm_checkpoint_gives_the_reference_logits():
    config = config_from_mamba_ssm(HF_CONFIG)
    assert config.vocab_size == 104 and not config.notes
    model = MemMambaLM(config)
    sd = random_mamba_ssm_state_dict()
    assert load_mamba_ssm_state_dict(model, sd) == []
    ids = torch.randint(0, 104, (2, 23))
    with torch.no_grad():
        ours, _ = model(ids)
    torch.testing.assert_close(ours, mamba_lm_reference(sd, ids, 3), rtol=1e-4, atol=1e-4)


def test_import_into_memmamba_keeps_the_backbone_and_initialises_the_notes():
    model = MemMambaLM(config_from_mamba_ssm(HF_CONFIG, notes=True, summary_dim=8, attn_dim=16, attn_heads=2))
    sd = random_mamba_ssm_state_dict()
    initialised = {n: p.clone() for n, p in model.state_dict().items()}
    fresh = load_mamba_ssm_state_dict(model, sd)
    assert fresh and all(any(k in n for k in ("memory_in", "gate_bias", "attention", "fusion")) for n in fresh)
    ours = model.state_dict()
    backbone = {name.removeprefix("backbone."): tensor for name, tensor in sd.items()}
    assert sorted(fresh) == sorted(set(ours) - set(backbone))        # every other tensor comes from the checkpoint
    for name, tensor in backbone.items():
        assert torch.equal(ours[name], tensor), name
    for name in fresh:                                                # the notes keep their initialisation
        assert torch.equal(ours[name], initialised[name]), name


def test_import_refuses_a_vocabulary_mismatch():
    model = MemMambaLM(config_from_mamba_ssm({**HF_CONFIG, "vocab_size": 200}))
    with pytest.raises(ConfigError, match="vocabulary mismatch: the checkpoint has 104 embedding rows, model.vocab_size is 200"):
        load_mamba_ssm_state_dict(model, random_mamba_ssm_state_dict())


def test_import_refuses_a_shape_mismatch():
    model = MemMambaLM(config_from_mamba_ssm({**HF_CONFIG, "ssm_cfg": {"d_state": 16}}))
    # x_proj: dt_rank (ceil(48 / 16) = 3) + 2 d_state rows, over E = 2 * 48 columns
    with pytest.raises(ConfigError, match=re.escape("checkpoint layers.0.mixer.x_proj.weight has shape (19, 96), "
                                                    "the model expects (35, 96)")):
        load_mamba_ssm_state_dict(model, random_mamba_ssm_state_dict())


def test_import_cli_writes_a_loadable_export(tmp_path):
    torch.save(random_mamba_ssm_state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    out = tmp_path / "export"
    assert import_main(["--weights", str(tmp_path / "pytorch_model.bin"), "--config", str(tmp_path / "config.json"),
                        "--out", str(out)]) == 0
    model = load_pretrained(out)
    ids = torch.randint(0, 104, (1, 11))
    with torch.no_grad():
        ours, _ = model(ids)
    torch.testing.assert_close(ours, mamba_lm_reference(random_mamba_ssm_state_dict(), ids, 3), rtol=1e-4, atol=1e-4)


def test_import_cli_reports_a_missing_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    code = import_main(["--weights", str(tmp_path / "nope.bin"), "--config", str(tmp_path / "config.json"),
                        "--out", str(tmp_path / "out")])
    assert code == 1 and "nope.bin" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section", [{"arch": "memmamba", "size": "tiny", "pool_policy": "priority"},
                                     {"arch": "transformer", "size": "tiny"}])
def test_save_and_load_round_trip(tmp_path, section):
    torch.manual_seed(0)
    model = build_model(section).eval()
    save_pretrained(model, tmp_path, {"tokenizer_checksum": "abc"})
    loaded = load_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["tokenizer_checksum"] == "abc"
    ids = torch.randint(0, 1024, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.embedding.weight.data_ptr()


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_a_compiled_model_saves_as_the_model_it_wraps(tmp_path, tie_embeddings):
    """torch.compile(model) names its weights _orig_mod.*: saved as they were, the tied head (the embedding under a
    second name) stopped safetensors, and an untied model's export did not load."""
    torch.manual_seed(0)
    model = build_model({"arch": "memmamba", "size": "tiny", "tie_embeddings": tie_embeddings}).eval()
    save_pretrained(torch.compile(model), tmp_path)
    ids = torch.randint(0, 1024, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path)(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_metadata_cannot_replace_the_models_config(tmp_path):
    """metadata={"model": ...} used to replace the config in config.json: the save succeeded, the load failed."""
    with pytest.raises(ValueError, match="metadata cannot hold \"model\": config.json's \"model\" section is the"):
        save_pretrained(build_model({"arch": "memmamba", "size": "tiny"}), tmp_path, {"model": "memmamba-tiny"})
    assert not (tmp_path / "config.json").exists()


def test_saved_files_are_readable_as_the_umask_allows(tmp_path):
    previous = os.umask(0o027)
    try:
        save_pretrained(build_model({"arch": "memmamba", "size": "tiny"}), tmp_path)
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


def test_an_interrupted_save_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first, second = build_model({"arch": "memmamba", "size": "tiny"}), build_model({"arch": "memmamba", "size": "tiny"})
    tokenizer, out = tmp_path / "tokenizer.model", tmp_path / "export"
    tokenizer.write_bytes(b"pieces")
    save_pretrained(first, out, files=[tokenizer])

    def interrupted(tensors, path):   # stopped halfway through writing the weights
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrained, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(second, out, files=[tokenizer])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    ids = torch.randint(0, 1024, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(ids)[0], first(ids)[0], rtol=0, atol=0)


def test_load_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda info: info["model"].update(d_model=32), "embedding.weight has shape [1024, 64], its config.json makes "
                                                    "[1024, 32]"),
    (lambda info: info.pop("model"), 'config.json: no "model" section'),
    (lambda info: info.update(model=[1]), 'config.json: no "model" section'),
    (lambda info: info["model"].update(window=8), "config.json: unknown key model.window"),   # e.g. a later version's
])
def test_load_names_a_config_json_that_disagrees_with_its_weights(tmp_path, edit, message):
    save_pretrained(build_model({"arch": "memmamba", "size": "tiny"}), tmp_path)
    info = json.loads((tmp_path / "config.json").read_text())
    edit(info)
    (tmp_path / "config.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pretrained(tmp_path)


def test_an_untied_checkpoint_imports_with_its_own_head_and_is_refused_as_tied():
    sd = random_mamba_ssm_state_dict()
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    model = MemMambaLM(config_from_mamba_ssm({**HF_CONFIG, "tie_embeddings": False}))
    assert load_mamba_ssm_state_dict(model, sd) == []
    ids = torch.randint(0, 104, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], mamba_lm_reference(sd, ids, 3), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="lm_head.weight differs from backbone.embedding.weight"):
        load_mamba_ssm_state_dict(MemMambaLM(config_from_mamba_ssm(HF_CONFIG)), sd)


@pytest.mark.parametrize("config, message", [
    ({**HF_CONFIG, "rms_norm": False}, "rms_norm=false"),
    ({**HF_CONFIG, "d_intermediate": 96}, "d_intermediate=96"),
    ({**HF_CONFIG, "attn_layer_idx": [1]}, r"attn_layer_idx=\[1\]"),
    ({**HF_CONFIG, "ssm_cfg": {"d_state": 8, "bias": True}}, "ssm_cfg.bias=true"),
    ({**HF_CONFIG, "ssm_cfg": {"layer": "Mamba2"}}, "only Mamba-1 checkpoints"),
    ({"hidden_size": 48, "num_hidden_layers": 3, "vocab_size": 104, "state_size": 8}, "no 'd_model'"),   # transformers'
])
def test_import_refuses_a_config_outside_the_mamba1_layout_in_one_line(config, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mamba_ssm(config)


def test_import_cli_names_a_file_it_cannot_read_or_write(tmp_path, capsys):
    torch.save(random_mamba_ssm_state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    weights, config = tmp_path / "pytorch_model.bin", tmp_path / "config.json"
    for given, message in [((weights, weights, tmp_path / "out"), f"{weights}: not a JSON file ("),
                           ((config, config, tmp_path / "out"), f"{config}: not a PyTorch state dict"),
                           ((weights, config, weights / "out"), f"{weights / 'out'}: ")]:
        code = import_main([arg for pair in zip(["--weights", "--config", "--out"], map(str, given)) for arg in pair])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
