"""The planner's traffic meter (`vidtok_jax.planning.traffic`): bytes per op from compiled HLO,
grouped by model part, tile padding, and the before / after comparison."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from vidtok_jax.planning import traffic


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), name="conv")(x)
    x = nn.GroupNorm(2, name="norm")(x)
    return nn.silu(x).sum()


@pytest.fixture(scope="module")
def compiled():
  m = Toy()
  x = jnp.ones((2, 16, 16, 3))
  p = m.init(jax.random.key(0), x)
  return jax.jit(jax.grad(lambda p, x: m.apply(p, x))).lower(p, x).compile()


def test_bytes_add_up_to_xla_total_and_groups_name_modules(compiled):
  r = traffic.report(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Charged like XLA's cost model (operands + outputs of each executed op): the same total.
  assert r["bytes"] == pytest.approx(cost["bytes accessed"], rel=0.02)
  groups = {g["group"]: g for g in r["groups"]}
  # The top module is named in the autodiff wrapper (`jvp(Toy)`).
  assert {"Toy/conv", "Toy/norm", "bwd Toy/conv", "bwd Toy/norm"} <= set(groups)
  # The conv's input-gradient / weight-gradient ops are backward ones.
  assert groups["bwd Toy/conv"]["bytes"] > 0 and groups["Toy/conv"]["bytes"] > 0
  assert sum(g["bytes"] for g in r["groups"]) == r["bytes"]
  assert r["top"][0]["bytes"] >= r["top"][-1]["bytes"]
  assert "convolution" in r["opcodes"]


def test_tile_padding():
  # bf16[1,17,128,128,3] in T(8,128): the minor dim 3 pads to 128, 128 stays: 42.7x.
  lo, pa = traffic.shape_bytes("bf16[1,17,128,128,3]{4,3,2,1,0:T(8,128)(2,1)}")
  assert lo == 2 * 17 * 128 * 128 * 3 and pa == 2 * 17 * 128 * 128 * 128
  # Layout order matters: minor-to-major {3,4,...}: dim 3 is most minor.
  lo, pa = traffic.shape_bytes("f32[2,5,7,9,3]{3,4,2,1,0:T(8,128)}")
  assert lo == 4 * 2 * 5 * 7 * 9 * 3 and pa == 4 * 2 * 5 * 7 * 128 * 8
  assert traffic.shape_bytes("(f32[4]{0}, s8[3]{0})") == (19, 19)


def test_model_part():
  name = "jit(train_step)/transpose(jvp(VidTok))/decoder/up_1/block_0/conv1/conv_general_dilated"
  assert traffic.model_part(name) == "bwd VidTok/decoder/up_1"
  assert traffic.model_part(name, depth=3) == "bwd VidTok/decoder/up_1/block_0"
  assert traffic.model_part("jit(f)/jvp(VidTok)/encoder/conv_in/add") == "VidTok/encoder/conv_in"
  assert traffic.model_part("jit(train_step)/optimizer/mul") == "optimizer"
  name = "jit(encode)/VidTok.encode/encoder/down_0/block_1/conv/conv_general_dilated"
  assert traffic.model_part(name) == "VidTok/encoder/down_0"
  assert traffic.model_part("jit(f)/VidTok.encode/VidTok._regularize/mul") == "VidTok"
  assert traffic.model_part("") == "(unnamed)"
  # The planner's encode / decode take the weights as `params`.
  assert (traffic.model_part("params[\\'decoder\\'][\\'up_1\\'][\\'block_0\\']")
          == "weights VidTok/decoder/up_1")


def test_compare_cli(compiled, tmp_path, capsys):
  r = traffic.report(compiled.as_text())
  before, after = tmp_path / "a.json", tmp_path / "b.json"
  before.write_text(json.dumps([{"op": "x"}, {"traffic": r}]))
  half = json.loads(json.dumps(r))
  for g in half["groups"]:
    g["bytes"] //= 2
  half["bytes"] = sum(g["bytes"] for g in half["groups"])
  after.write_text(json.dumps({"traffic": half}))
  assert traffic.main(["compare", str(before), str(after)]) == 0
  out = capsys.readouterr().out
  assert "bwd Toy/conv" in out and "total (0.50x)" in out
  assert traffic.main(["compare", "--hbm", str(before), str(after)]) == 0  # HBM: unchanged
  assert "total (1.00x)" in capsys.readouterr().out
  old = dict(r)
  del old["measure"]  # a report written by the meter before both measures existed
  (tmp_path / "d.json").write_text(json.dumps({"traffic": old}))
  with pytest.raises(SystemExit, match="different meters"):
    traffic.main(["compare", str(tmp_path / "d.json"), str(after)])
  (tmp_path / "c.json").write_text("{}")
  with pytest.raises(SystemExit, match="no plan record"):
    traffic.main(["compare", str(before), str(tmp_path / "c.json")])


HLO = """HloModule m, is_scheduled=true

%fused (p0: bf16[8,128]) -> bf16[8,128] {
  %p0 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %n = bf16[8,128]{1,0:T(8,128)(2,1)} negate(%p0), metadata={op_name="jit(f)/jvp(M)/enc/neg"}
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %cs = (bf16[8,128]{1,0:T(8,128)(2,1)}, bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}) copy-start(%a)
  %cd = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  ROOT %f = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%cd), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/jvp(M)/enc/neg"}
}
"""


def test_on_chip_copies_count_in_both_measures_and_take_their_users_name():
  r = traffic.report(HLO)
  rows = {o["opcode"]: o for o in r["top"]}
  kib2 = 8 * 128 * 2
  # XLA's measure counts every memory space: copy-start reads 2 KiB of HBM and writes 2 KiB of
  # VMEM (plus a 4-byte sync flag); the fusion reads the VMEM copy and writes 2 KiB of HBM.
  assert rows["copy-start"]["bytes"] == 2 * kib2 + 4
  assert rows["fusion"]["bytes"] == 2 * kib2
  # HBM bytes: the copy's read and the fusion's write only.
  assert rows["copy-start"]["padded"] == kib2 and rows["fusion"]["padded"] == kib2
  assert rows["copy-start"]["group"] == "M/enc"  # named after the fusion that uses what it moves


def test_step_arguments_group_by_path():
  part = traffic.model_part
  assert (part("state.g_params[\\'model\\'][\\'encoder\\'][\\'mid\\'][\\'block_0\\']"
               "[\\'conv1\\'][\\'kernel\\']") == "weights VidTok/encoder/mid")
  assert part("state.g_opt_state[1][0].mu[\\'model\\'][\\'decoder\\']") == "optimizer state"
  assert part("state.lpips_params[\\'vgg16\\'][\\'conv1_1\\']") == "weights LPIPS/vgg16/conv1_1"
  assert part("state.ema_params[\\'model\\'][\\'decoder\\']") == "EMA weights VidTok/decoder"
