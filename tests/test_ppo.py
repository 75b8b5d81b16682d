"""PPO with a value model as stages: GAE and the value loss computed by hand, checked against TRL's PPO GAE loop,
the critic's per-token values aligned with the model's own scores, and build-batches --advantage gae ->
train --loss value / --loss ppo on the tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import cli, ok, rows_of

from alignpipe.batches.gae import explained_variance, gae, gae_estimator, whiten
from alignpipe.training.losses import LOSSES, PG_LOSSES, compute_loss
from alignpipe.training.policy_gradient import TokenInputs
from alignpipe.training.value_loss import ValueInputs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ GAE by hand
def test_gae_by_hand():
    """reward 1 at the last of 3 tokens, V = (0.5, 0.25, 0.75), gamma 0.9, lambda 0.8 (gamma lambda = 0.72):
    delta = (0.9*0.25 - 0.5, 0.9*0.75 - 0.25, 1 - 0.75) = (-0.275, 0.425, 0.25)
    A_2 = 0.25;  A_1 = 0.425 + 0.72*0.25 = 0.605;  A_0 = -0.275 + 0.72*0.605 = 0.1606;  R = A + V."""
    adv, ret = gae(1.0, [0.5, 0.25, 0.75], gamma=0.9, lam=0.8)
    assert adv == pytest.approx([0.1606, 0.605, 0.25], abs=1e-12)
    assert ret == pytest.approx([0.6606, 0.855, 1.0], abs=1e-12)


def test_gae_with_gamma_and_lambda_one_is_reward_minus_value():
    adv, ret = gae(2.0, [0.5, -1.0, 3.0], gamma=1.0, lam=1.0)
    assert adv == [1.5, 3.0, -1.0] and ret == [2.0, 2.0, 2.0]


def test_gae_with_lambda_zero_is_the_td_error():
    adv, _ = gae(1.0, [0.5, 0.25, 0.75], gamma=0.9, lam=0.0)
    assert adv == pytest.approx([-0.275, 0.425, 0.25], abs=1e-12)


def test_gae_at_the_ends_of_answers():
    """The last token sees the reward and no next value (V_n = 0); a one-token answer gets r - V_0; the next
    answer's values never leak into this one's advantages."""
    assert gae(3.0, [1.25], gamma=0.5, lam=0.5) == ([1.75], [3.0])
    a1, _ = gae(1.0, [0.2, 0.4], gamma=0.9, lam=0.95)
    assert a1[-1] == pytest.approx(1.0 - 0.4)
    together, _ = gae_estimator([1.0, 0.0], [[0.2, 0.4], [9.0, 9.0, 9.0]], gamma=0.9, lam=0.95, whiten_advantages=False)
    assert together[0] == a1


def test_whiten_by_hand():
    """[[1, 2], [3]]: mean 2, Bessel variance (1 + 0 + 1) / 2 = 1 -> (a - 2) / sqrt(1 + 1e-8)."""
    s = 1 / math.sqrt(1 + 1e-8)
    assert whiten([[1.0, 2.0], [3.0]]) == [[-s, 0.0], [s]]
    assert whiten([[4.0]]) == [[0.0]]
    assert explained_variance([1.0, 2.0], [1.0, 2.0]) == 1.0 and explained_variance([0.0], [5.0]) is None


def trl_ppo_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """TRL's PPOTrainer GAE, transcribed (huggingface/trl, trl/trainer/ppo_trainer.py, `train`, steps 5-6; the
    loop also in OpenRLHF's `get_advantages_and_returns` and verl's `compute_gae_advantage_return`): right-padded
    (B, T) tensors, values zero on padding, the score added at the last token of each response."""
    lastgaelam, advantages_reversed = 0, []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    return advantages, advantages + values


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_trl_ppo_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths, scores = [5, 2, 1, 4], [1.0, -0.5, 2.0, 0.0]
    values = [torch.randn(n, generator=g, dtype=torch.float64).tolist() for n in lengths]
    T = max(lengths)
    v = torch.zeros(len(lengths), T, dtype=torch.float64)
    r = torch.zeros_like(v)
    for i, (n, s) in enumerate(zip(lengths, scores)):
        v[i, :n] = torch.tensor(values[i], dtype=torch.float64)
        r[i, n - 1] = s
    trl_adv, trl_ret = trl_ppo_gae(r, v, gamma, lam)
    ours = [gae(s, vals, gamma=gamma, lam=lam) for s, vals in zip(scores, values)]
    for i, n in enumerate(lengths):
        assert ours[i][0] == pytest.approx(trl_adv[i, :n].tolist(), abs=1e-12)
        assert ours[i][1] == pytest.approx(trl_ret[i, :n].tolist(), abs=1e-12)
    whitened = whiten([a for a, _ in ours])  # TRL: masked_whiten(advantages, ~padding_mask), Bessel-corrected
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    flat = trl_adv[mask]
    ref = (trl_adv - flat.mean()) * torch.rsqrt(flat.var(unbiased=True) + 1e-8)
    assert [x for w in whitened for x in w] == pytest.approx(ref[mask].tolist(), abs=1e-12)


_TRL_LOOP = ["nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0",
             "delta = rewards[:, t] + gamma * nextvalues - values[:, t]",
             "lastgaelam = delta + gamma * lam * lastgaelam",
             "advantages = torch.stack(advantages_reversed[::-1], axis=1)", "returns = advantages + values"]


def test_the_transcription_is_trls_installed_ppo_loop():
    """Where the installed TRL still ships PPOTrainer (TRL < 1.0), its source holds the transcribed loop line for
    line (`args.` prefixes aside; so it does in TRL 0.19.1's trl/trainer/ppo_trainer.py, lines 524-534); TRL 1.x
    has no PPOTrainer, so the check is skipped with that reason."""
    import importlib.util

    trl = pytest.importorskip("trl", reason="TRL is a bench extra (pip install -e '.[bench]'); not in make test")
    spec = None
    for module in ("trl.trainer.ppo_trainer", "trl.experimental.ppo.ppo_trainer"):
        try:
            spec = spec or importlib.util.find_spec(module)
        except ModuleNotFoundError:
            continue
    if spec is None or spec.origin is None:
        pytest.skip(f"TRL {trl.__version__} ships no PPOTrainer (removed in TRL 1.x); test_gae_matches_trl_ppo_loop "
                    "checks against its GAE loop transcribed")
    source = " ".join(Path(spec.origin).read_text().replace("self.args.", "").replace("args.", "").split())
    assert all(line in source for line in _TRL_LOOP)


# ----------------------------------------------------------------------------------- the value loss by hand
def _value_inputs(values, old, returns, weight=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    v = t(values).requires_grad_()
    return ValueInputs(values=v, old_values=t(old), returns=t(returns), mask=torch.ones_like(v.detach()),
                       weight=t(weight or [1.0] * len(values))), v


def test_value_loss_by_hand():
    """Token 0: V 1.0, V_old 0.5, R 0: (V-R)^2 = 1, clip(V) = 0.7 -> 0.49; l = 0.5 max = 0.5, dl/dV = V - R = 1.
    Token 1: V 0.9, V_old 0.5, R 1: (V-R)^2 = 0.01, clip(V) = 0.7 -> 0.09 wins: l = 0.045, dl/dV = 0 (clipped).
    Token mean: 0.2725; without clipping: 0.5 * (1 + 0.01) / 2 = 0.2525."""
    x, v = _value_inputs([[1.0, 0.9]], [[0.5, 0.5]], [[0.0, 1.0]])
    loss, m = compute_loss("value", x, clip=0.2)
    assert loss.item() == pytest.approx(0.2725) and m["loss"].item() == pytest.approx(0.2725)
    assert m["value/clipfrac"].item() == 0.5
    (grad,) = torch.autograd.grad(loss, v)
    assert grad[0].tolist() == pytest.approx([0.5, 0.0])
    x, _ = _value_inputs([[1.0, 0.9]], [[0.5, 0.5]], [[0.0, 1.0]])
    assert compute_loss("value", x, clip=0.0)[0].item() == pytest.approx(0.2525)


def test_value_loss_weights_count_tokens():
    """Answer 2 (one token, l = 0.5*(0-2)^2 = 2) with weight 3 next to answer 1 (two tokens, l = 0.5 each):
    (1*(0.5 + 0.5) + 3*2) / (1*2 + 3*1) = 7/5; the loss table's S divides by the weighted mean length 5/4."""
    x = ValueInputs(values=torch.tensor([[1.0, 1.0], [0.0, 0.0]]), old_values=torch.tensor([[1.0, 1.0], [0.0, 0.0]]),
                    returns=torch.tensor([[0.0, 2.0], [2.0, 0.0]]), mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                    weight=torch.tensor([1.0, 3.0]))
    s, m = compute_loss("value", x)
    assert m["loss"].item() == pytest.approx(7 / 5) and s.item() == pytest.approx(7 / (5 / 4))
    assert compute_loss("value", x, mean_tokens=2.0)[0].item() == pytest.approx(7 / 2)


def test_per_token_advantages_in_the_clipped_surrogate():
    """A (B, T) advantage equal along each answer is the (B,) one; per token it weighs each token's term."""
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    base = {"logp": logp, "behaviour_logp": logp + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64),
            "mask": torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64),
            "weight": torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)}
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for name in ("ppo", "grpo", "dapo"):
        a, ma = PG_LOSSES[name](TokenInputs(advantage=adv, **base))
        b, mb = PG_LOSSES[name](TokenInputs(advantage=adv[:, None].expand(3, 4).clone(), **base))
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
        # the metric: a mean over answers (1*0.5 - 2*1 + 0.5*2) / 3.5, per token over tokens (3*0.5 - 8 + 1) / 11.5
        assert ma["advantage/mean"].item() == pytest.approx(-0.5 / 3.5)
        assert mb["advantage/mean"].item() == pytest.approx(-5.5 / 11.5)
    rho = torch.exp(base["logp"] - base["behaviour_logp"])
    per_tok = torch.tensor([[1.0, 0.0, -1.0, 5.0]], dtype=torch.float64)  # padding's 5 must not count
    one = {k: v[:1] for k, v in base.items()}
    one["mask"] = torch.tensor([[1.0, 1, 1, 0]], dtype=torch.float64)
    s, _ = PG_LOSSES["ppo"](TokenInputs(advantage=per_tok, **one), mean_tokens=3.0)
    clipped = torch.clamp(rho[0, :3], 0.8, 1.2)
    expect = -(torch.minimum(rho[0, :3] * per_tok[0, :3], clipped * per_tok[0, :3])).sum() / 3
    assert s.item() == pytest.approx(expect.item())


def test_ppo_and_value_rows():
    assert LOSSES["value"].model == "value" and "value" not in PG_LOSSES and "ppo" in PG_LOSSES
    assert LOSSES.parse("value,clip=0.5").kwargs == {"clip": 0.5, "mean_tokens": 0.0}


# ----------------------------------------------------------------------------------------- the critic
def test_critic_values_are_the_model_scores_of_the_prefixes(tiny_rm_dir):
    """V(x, y_<t) at answer token t is the reward model's own (pooled) score of the prefix x, y_<t."""
    from alignpipe.models.logprobs import collate
    from alignpipe.models.values import load_value_model, token_values

    model, init = load_value_model(tiny_rm_dir, pad_token_id=0)
    assert init == "sequence-classification"
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13]]
    with torch.no_grad():
        values, mask = token_values(model.eval(), collate(prompts, responses, 0))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            for t in range(len(r)):
                prefix = torch.tensor([p + r[:t]])
                score = model(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits[0, 0]
                assert values[i, t].item() == pytest.approx(score.item(), abs=1e-5)
    assert mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def test_a_causal_lm_critic_gets_a_zero_value_head(tiny_lm_dir):
    from alignpipe.models.logprobs import collate
    from alignpipe.models.values import load_value_model, token_values

    model, init = load_value_model(tiny_lm_dir, pad_token_id=0)
    assert init == "causal LM + zero value head" and type(model).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        values, _ = token_values(model, collate([[5, 6]], [[7, 8, 9]], 0))
    assert values.tolist() == [[0.0, 0.0, 0.0]]


# ----------------------------------------------------------------------------------------- the stages
@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_lm_dir):
    d = tmp_path_factory.mktemp("ppo")
    rows = [json.loads(x) for x in (ROOT / "pipelines/data/arithmetic.jsonl").read_text().splitlines()]
    src = d / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["split"] == "train"][:4]))
    ok("import", src, "--out", d / "prompts")
    ok("generate", d / "prompts", "--policy", tiny_lm_dir, "--out", d / "gen", "--num-samples", 2,
       "--max-new-tokens", 5, "--device", "cpu")
    ok("annotate", d / "gen", "--annotator", "length,weight=0.1", "--pairing", "pointwise", "--out", d / "ann")
    return d


def test_gae_batches_with_a_fresh_critic_by_hand(annotated, tiny_lm_dir):
    """Zero values: A_t = (gamma lam)^(n-1-t) r = R_t (gamma 1, lam 0.5, no whitening); every group kept."""
    out = annotated / "gae-fresh"
    ok("build-batches", annotated / "ann", "--task", "group", "--advantage",
       f"gae,gamma=1,lam=0.5,whiten=false,critic={tiny_lm_dir}", "--tokenizer", tiny_lm_dir, "--out", out)
    rows = rows_of(out)
    assert len(rows) == 8  # 4 prompts x 2 answers, equal groups kept
    for row in rows:
        n, r = len(row["response1_input_ids"]), row["response1_reward"]
        expect = [0.5 ** (n - 1 - t) * r for t in range(n)]
        assert row["response1_values"] == [0.0] * n
        assert row["response1_token_advantages"] == pytest.approx(expect, rel=1e-6)
        assert row["response1_returns"] == pytest.approx(expect, rel=1e-6)
        assert row["response1_advantage"] == pytest.approx(sum(expect) / n, rel=1e-6)
    report = json.loads((out / "manifest.json").read_text())["report"]
    assert report["gae"]["value_mean"] == 0.0 and report["gae"]["critic"] == str(tiny_lm_dir)


@pytest.fixture(scope="module")
def rm_batches(annotated, tiny_lm_dir, tiny_rm_dir):
    out = annotated / "gae-rm"
    ok("build-batches", annotated / "ann", "--task", "group", "--advantage", f"gae,critic={tiny_rm_dir}",
       "--tokenizer", tiny_lm_dir, "--reference", tiny_lm_dir, "--shard-size", 3, "--out", out)
    return out


def test_gae_batches_from_a_reward_model_critic(rm_batches):
    """Values and reference log-probs computed in the same resumable shards; GAE recomputed from the stored
    values and rewards gives the stored returns and whitened advantages."""
    rows = rows_of(rm_batches)
    adv, ret = gae_estimator([r["response1_reward"] for r in rows], [r["response1_values"] for r in rows])
    for row, a, rt in zip(rows, adv, ret):
        assert len(row["response1_values"]) == len(row["response1_input_ids"]) == len(row["response1_ref_logps"])
        assert row["response1_token_advantages"] == pytest.approx(a, abs=1e-5)
        assert row["response1_returns"] == pytest.approx(rt, abs=1e-5)
    flat = [a for row in rows for a in row["response1_token_advantages"]]
    assert abs(sum(flat) / len(flat)) < 1e-5 and any(v != 0 for row in rows for v in row["response1_values"])


def test_train_the_critic_then_the_policy_then_batches_from_the_trained_critic(annotated, rm_batches, tiny_lm_dir,
                                                                                tmp_path):
    critic = tmp_path / "critic"
    ok("train", rm_batches, "--policy", tiny_lm_dir, "--loss", "value,clip=0.2", "--lr", "1e-3", "--device", "cpu",
       "--out", critic)
    config = json.loads((critic / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    metrics = [json.loads(x) for x in (critic / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) and "value/clipfrac" in m for m in metrics)
    ok("train", rm_batches, "--policy", tiny_lm_dir, "--loss", "ppo,kl_coef=0.05", "--lr", "1e-3", "--device", "cpu",
       "--out", tmp_path / "policy")
    again = tmp_path / "again"
    ok("build-batches", annotated / "ann", "--task", "group", "--advantage", f"gae,critic={critic}",
       "--tokenizer", tiny_lm_dir, "--out", again)
    assert any(v != 0 for row in rows_of(again) for v in row["response1_values"])


def test_ppo_bad_inputs_are_one_line_errors(annotated, tiny_lm_dir, tmp_path):
    plain = tmp_path / "plain"
    ok("build-batches", annotated / "ann", "--task", "group", "--advantage", "dr-grpo", "--equal-groups", "keep",
       "--tokenizer", tiny_lm_dir, "--out", plain)
    r = cli("train", plain, "--policy", tiny_lm_dir, "--loss", "value", "--device", "cpu", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "column 'response1_returns' is null" in r.output and "gae,critic=" in r.output
    r = cli("build-batches", annotated / "ann", "--task", "group", "--advantage", f"gae,critic={tmp_path}/none",
            "--tokenizer", tiny_lm_dir, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "critic" in r.output
    r = cli("build-batches", annotated / "ann", "--task", "group", "--advantage", "gae", "--tokenizer", tiny_lm_dir,
            "--out", tmp_path / "b")
    assert r.exit_code == 2 and "needs critic" in r.output


def test_rl_recipe_algo_ppo_trains_the_critic_beside_the_policy(tmp_path):
    """`make -f pipelines/rl.mk ALGO=ppo`: iteration K's batches take GAE from critic K-1 (critic 0 = the model with
    a new value head), critic K is trained on them beside policy K; SHAPING adds annotators to the reward."""
    import subprocess
    import sys

    run = tmp_path / "r"
    args = ["make", "-n", "-f", "pipelines/rl.mk", "run", f"PY={sys.executable}", f"RUN={run}", "MODEL=M", "ALGO=ppo",
            "ITERS=2", "SHAPING=overlong,max_tokens=8,cache=4,weight=0.5 format"]
    text = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [" ".join(x.split()) for x in text.replace("\\\n", " ").splitlines()]

    def command(stage: str, out: str) -> str:
        (found,) = [x for x in lines if f" {stage} " in x and f"--out {run}/{out} " in x + " "]
        return found

    a, b = (0, 1) if f"{run}/iter-0/batches" in text else (1, 2)  # the first two iterations, however numbered
    assert "--annotator 'overlong,max_tokens=8,cache=4,weight=0.5' --annotator 'format'" in command(
        "annotate", f"iter-{a}/annotations")
    assert "--advantage 'gae,gamma=1.0,lam=0.95,critic=M'" in command("build-batches", f"iter-{a}/batches")
    assert f"critic={run}/iter-{a}/critic'" in command("build-batches", f"iter-{b}/batches")
    assert "--policy M --loss 'value,clip=0.2'" in command("train", f"iter-{a}/critic")
    assert f"--policy {run}/iter-{a}/critic --loss 'value,clip=0.2'" in command("train", f"iter-{b}/critic")
    assert f"--continue-from {run}/iter-{a}/critic" in command("train", f"iter-{b}/critic")  # CONTINUE=1
    assert "--loss 'ppo'" in command("train", f"iter-{b}/policy")
    assert lines.index(command("train", f"iter-{a}/critic")) < lines.index(command("build-batches", f"iter-{b}/batches"))


def test_a_critic_is_not_where_the_batches_answers_came_from(tmp_path):
    """--max-staleness reads the lag of the answers from the manifests upstream of the batches; the critic the
    batches name (trained on the previous iteration's answers) is a model, not a source of rows."""
    from alignpipe.training import staleness

    def folder(name, stage, fp, *inputs):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({
            "stage": stage, "fingerprint": fp, "num_rows": 4,
            "inputs": [{"path": str(tmp_path / i), "fingerprint": f"fp-{i}"} for i in inputs]}))

    folder("p0", "import", "fp-p0")
    folder("gen1", "generate", "g1", "prompts", "p0")
    folder("ann1", "annotate", "a1", "gen1")
    folder("bat1", "build-batches", "b1", "ann1", "p0")
    folder("p1", "train", "fp-p1", "bat1", "p0")
    folder("critic1", "train", "fp-critic1", "bat1", "p0")
    folder("gen2", "generate", "g2", "prompts", "p1")
    folder("ann2", "annotate", "a2", "gen2")
    folder("bat2", "build-batches", "b2", "ann2", "p0", "critic1")
    assert [m["fingerprint"] for m in staleness.generate_ancestors(tmp_path / "bat2")] == ["g2"]
