import pytest

from phd import PRESETS, ConfigError, PHDConfig

ARCH = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.mark.parametrize(
    "name, fields",
    [
        ("vanilla", dict(repeat_k=1, window=None, chunk=None, naive=False)),
        ("repeat-3", dict(repeat_k=3, naive=True)),
        ("PHD-3", dict(repeat_k=3, window=None, chunk=None)),
        ("PHD-SWA-5-16-inf", dict(repeat_k=5, window=16, chunk=None)),
        ("PHD-CSWA-3-16-32", dict(repeat_k=3, window=16, chunk=32)),
    ],
)
def test_paper_names_parse_and_print(name, fields):
    cfg = PHDConfig.from_name(name, **ARCH)
    for key, value in fields.items():
        assert getattr(cfg, key) == value
    assert cfg.name == name
    assert PHDConfig.from_name(cfg.name, **ARCH) == cfg


def test_name_forms_are_case_insensitive_and_inf_optional():
    assert PHDConfig.from_name("phd-swa-2-4", **ARCH).name == "PHD-SWA-2-4-inf"
    assert PHDConfig.from_name("PHD-1", **ARCH).name == "vanilla"


@pytest.mark.parametrize(
    "changes, field, hint",
    [
        (dict(repeat_k=0), "repeat_k", ">= 1"),
        (dict(window=0), "window", ">= 1"),
        (dict(chunk=32), "chunk", "needs a window"),
        (dict(chunk=0, window=4), "chunk", ">= 1"),
        (dict(n_heads=5), "n_heads", "divide d_model=32"),
        (dict(n_kv_heads=3), "n_kv_heads", "divide n_heads=4"),
        (dict(positions="rope"), "positions", "expanded"),
        (dict(norm="sandwich"), "norm", "pre"),
        (dict(attn_backend="xformers"), "attn_backend", "split"),
        (dict(naive=True, repeat_k=2, window=4), "naive", "no window"),
        (dict(vocab_size=0), "vocab_size", ">= 1"),
        # a window no sequence reaches (an edited config.json once ran such a model as PHD-K, silently)
        (dict(repeat_k=2, window=4096, max_seq_len=512), "window", "W must be <= max_seq_len=512"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(changes, field, hint):
    with pytest.raises(ConfigError) as err:
        PHDConfig(**{**ARCH, **changes})
    message = str(err.value)
    assert message.startswith(f"{field}=")
    assert repr(changes[field]) in message
    assert hint in message


def test_unknown_name_lists_the_forms():
    with pytest.raises(ConfigError, match="PHD-CSWA-K-W-C"):
        PHDConfig.from_name("PHD-XL-3", **ARCH)


def test_json_round_trip(tmp_path):
    cfg = PHDConfig.from_name("PHD-CSWA-3-4-8", **ARCH, qk_norm=True, norm="post", positions="shared")
    cfg.save(tmp_path / "config.json")
    assert PHDConfig.load(tmp_path) == cfg
    data = cfg.to_dict()
    data["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        PHDConfig.from_dict(data)


@pytest.mark.parametrize(
    "preset, low, high",
    [("cpu-tiny", 0.3e6, 0.35e6), ("cpu-1m", 0.8e6, 1.3e6), ("cpu-1m-olmo2", 0.8e6, 1.3e6), ("cpu-10m", 8e6, 12e6),
     ("cpu-30m", 25e6, 35e6), ("bench-100m", 90e6, 120e6)],
)
def test_cpu_presets_have_their_advertised_size(preset, low, high):
    assert low <= PHDConfig.preset(preset).num_params() <= high


def test_paper_presets_match_spec_section_7():
    big = PHDConfig.preset("paper-1.2b", "PHD-CSWA-3-16-32")
    shape = (big.n_layers, big.d_model, big.d_ff, big.n_heads, big.n_kv_heads, big.head_dim)
    assert shape == (16, 2048, 16384, 32, 8, 64)
    assert big.norm == "post" and big.qk_norm
    mid = PHDConfig.preset("paper-550m", "PHD-SWA-3-16-inf")
    assert (mid.n_layers, mid.d_model, mid.d_ff, mid.n_heads, mid.n_kv_heads) == (16, 1536, 8192, 16, 4)
    assert set(PRESETS) >= {"paper-550m", "paper-1.2b", "cpu-1m", "cpu-10m", "cpu-30m"}


def test_unknown_preset():
    with pytest.raises(ConfigError, match="cpu-1m"):
        PHDConfig.preset("tiny")


# ----- one builder, one precedence: preset < variant name < explicit fields -----


def test_explicit_fields_win_over_preset_and_agree_with_the_name():
    cfg = PHDConfig.build("cpu-1m", "PHD-SWA-3-16-inf", d_model=64, max_seq_len=99, window=16)
    assert (cfg.d_model, cfg.max_seq_len, cfg.vocab_size, cfg.repeat_k, cfg.window) == (64, 99, 2048, 3, 16)
    assert PHDConfig.build("cpu-1m", window=4, repeat_k=2).name == "PHD-SWA-2-4-inf"
    assert PHDConfig.build("cpu-1m").name == "vanilla"


@pytest.mark.parametrize(
    "variant, field, value, named",
    [("PHD-SWA-3-16-inf", "window", 4, 16), ("vanilla", "repeat_k", 3, 1), ("PHD-CSWA-3-16-32", "chunk", None, 32),
     ("repeat-2", "naive", False, True)],
)
def test_a_variant_field_that_contradicts_the_name_is_an_error(variant, field, value, named):
    message = rf"{field}={value!r} contradicts variant '{variant}', which sets {field}={named!r}: drop {field}"
    with pytest.raises(ConfigError, match=message):
        PHDConfig.from_name(variant, preset="cpu-1m", **{field: value})
    with pytest.raises(ConfigError, match=message):
        PHDConfig.preset("cpu-1m", variant, **{field: value})


def test_every_builder_gives_the_same_config():
    from phd.train.config import ModelSpec, TrainConfigError

    fields = dict(d_model=64, window=16, positions="shared")
    expected = PHDConfig.build("cpu-1m", "PHD-SWA-3-16-inf", **fields)
    assert PHDConfig.from_name("PHD-SWA-3-16-inf", preset="cpu-1m", **fields) == expected
    assert PHDConfig.preset("cpu-1m", "PHD-SWA-3-16-inf", **fields) == expected
    assert ModelSpec("cpu-1m", "PHD-SWA-3-16-inf", fields).build() == expected
    with pytest.raises(TrainConfigError, match="window=4 contradicts variant 'PHD-SWA-3-16-inf'"):
        ModelSpec("cpu-1m", "PHD-SWA-3-16-inf", {"window": 4}).build()
