import pytest
from transformers import AutoConfig

import xlstm_hf
from xlstm_hf import xLSTMConfig


def test_paper_and_7b_stacks():
    c = xLSTMConfig(vocab_size=10, hidden_size=64, num_hidden_layers=8, num_heads=4, slstm_at=[7])
    assert c.block_types == ["m"] * 7 + ["s"]
    assert c.architecture == "paper" and c.norm_eps == 1e-5 and c.mlstm_inner_dim == 128
    c7 = xLSTMConfig(architecture="7b", vocab_size=10, hidden_size=64, num_hidden_layers=2, num_heads=4)
    assert c7.qk_head_dim == 8 and c7.v_head_dim == 16 and c7.ffn_dim == 192 and c7.norm_eps == 1e-6


def test_own_model_type_does_not_replace_builtin():
    from transformers.models.xlstm import xLSTMConfig as BuiltinConfig

    assert xLSTMConfig.model_type == "xlstm_hf"
    assert isinstance(AutoConfig.for_model("xlstm"), BuiltinConfig)
    assert isinstance(AutoConfig.for_model("xlstm_hf"), xlstm_hf.xLSTMConfig)


def test_roundtrip(tmp_path):
    c = xLSTMConfig(vocab_size=10, hidden_size=64, num_hidden_layers=4, num_heads=4, slstm_at=[3, 1])
    c.save_pretrained(tmp_path)
    d = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(d, xLSTMConfig) and d.slstm_at == [1, 3]
    assert d.to_diff_dict() == c.to_diff_dict()


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", -8),
        ("hidden_size", 0),
        ("vocab_size", -1),
        ("num_hidden_layers", 0),
        ("num_heads", 3),  # does not divide the mLSTM inner width 128
        ("num_heads", -2),
        ("slstm_at", [4]),  # out of range for 4 blocks
        ("slstm_at", [-1]),
        ("slstm_at", [1, 1]),
        ("slstm_num_heads", 3),
        ("architecture", "transformer"),
        ("chunk_size", 0),
        ("dropout", 1.5),
        ("norm_eps", -1e-5),
        ("ffn_activation", "tanh"),
        ("conv1d_kernel_size", -1),
        ("conv1d_kernel_size", 0),  # the mLSTM blocks need their conv
        ("pad_token_id", 10),
        ("state_dtype", "int8"),
        ("hidden_size", "64"),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    kwargs = dict(vocab_size=10, hidden_size=64, num_hidden_layers=4, num_heads=4, slstm_at=[2])
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        xLSTMConfig(**kwargs)


def test_7b_rejects_slstm_and_bad_head_split():
    with pytest.raises(ValueError, match="slstm_at"):
        xLSTMConfig(architecture="7b", hidden_size=64, num_heads=4, num_hidden_layers=2, slstm_at=[0])
    with pytest.raises(ValueError, match="num_heads"):
        xLSTMConfig(architecture="7b", hidden_size=64, num_heads=5, num_hidden_layers=2)


def test_removed_compile_decode_is_refused_when_asked_for_and_ignored_when_saved_off():
    """compile_decode went to generate()'s compile_config: True must not be silently ignored; a config.json saved with
    the old default (False) still loads, without the field."""
    with pytest.raises(ValueError, match="compile_decode.*compile_config"):
        xlstm_hf.xLSTMConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_heads=2, compile_decode=True)
    old = xlstm_hf.xLSTMConfig.from_dict(
        {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "compile_decode": False}
    )
    assert not hasattr(old, "compile_decode") and "compile_decode" not in old.to_dict()
