"""losses.py: log-probabilities and the training objectives, as pure functions (paper §3).

A preference loss takes fp32 per-sequence log-probs of the policy (pc, pr: chosen, rejected) and of
the reference (rc, rr) and returns per-example losses plus the detached implicit rewards
β·(log π - log π_ref). With h = (pc - rc) - (pr - rr), the log-ratio margin of paper §3.2:

    DPO (Eq. 3)      -log σ(β h)
    IPO              (h - 1/(2β))², Azar et al.'s form as TRL writes it, on mean log-probs per token
    SLiC             max(0, 1 - β h), the hinge
    Avg-DPO (Eq. 5)  γ L(y⁺, y⁻) + (1 - γ) L(y⁺, ỹ⁻): one external rejected, one from the policy
    RM (Eq. 1)       -log σ(r(x, y⁺) - r(x, y⁻)), the Bradley–Terry reward-model loss

The RL objectives (Eq. 2) work on sampled responses: PPO on per-token log-probs, values and GAE
advantages, RLOO on per-sequence log-probs with the leave-one-out baseline.
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Log-probs: -100 marks positions that are not scored (prompt, image, padding)


def gathered_logps(logits, targets):
    """(..., V) logits, (...) targets, already shifted -> (...) fp32 log-probs, 0 at -100."""
    lp = -F.cross_entropy(
        logits.float().flatten(0, -2), targets.clamp(min=0).flatten(), reduction="none"
    )
    return lp.view(targets.shape) * (targets != -100)


def token_logps(logits, labels):
    """(B, T, V) logits, (B, T) labels -> (B, T-1) log p(label_t | x_<t): t predicts t+1."""
    return gathered_logps(logits[:, :-1], labels[:, 1:])


def sequence_logps(logits, labels):
    """Sum of the response tokens' log-probs, one per sequence: (B,)."""
    return token_logps(logits, labels).sum(-1)


# -----------------------------------------------------------------------------
# Objectives


def sft_loss(logits, labels):
    """Mean negative log-likelihood over all scored tokens of the batch (a scalar)."""
    n = (labels[:, 1:] != -100).sum().clamp(min=1)
    return -token_logps(logits, labels).sum() / n


def rewards(p, r, beta):
    """The implicit reward β·log(π/π_ref) per response, detached: a diagnostic, not a gradient."""
    return (beta * (p - r)).detach()


def dpo_loss(pc, pr, rc, rr, beta=0.1):
    """Eq. 3: -log σ(β h). Gradient pushes pc up and pr down, each weighted by σ(-β h)."""
    h = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * h), rewards(pc, rc, beta), rewards(pr, rr, beta)


def ipo_loss(pc, pr, rc, rr, beta=0.1):
    """IPO: regress the margin h onto 1/(2β) instead of pushing it to infinity."""
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2, rewards(pc, rc, beta), rewards(pr, rr, beta)


def slic_loss(pc, pr, rc, rr, beta=0.1):
    """SLiC (hinge): zero loss, and zero gradient, once β h ≥ 1."""
    h = (pc - rc) - (pr - rr)
    return F.relu(1 - beta * h), rewards(pc, rc, beta), rewards(pr, rr, beta)


LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "slic": slic_loss}
LENGTH_NORM = {"ipo"}  # fed per-token mean log-probs, as TRL does for IPO; the others take sums


def rm_loss(sc, sr):
    """Eq. 1, Bradley–Terry: -log σ(r(x, y⁺) - r(x, y⁻)) on the reward head's scores (B,)."""
    return -F.logsigmoid(sc - sr), sc.detach(), sr.detach()


def preference_loss(name, logps, ref_logps, counts, beta=0.1, gamma=0.5, rpo_alpha=0.0):
    """A step's loss per pair. logps, ref_logps, counts: (B, K) summed log-probs and token counts;
    response 0 is chosen, 1 rejected, 2 a second rejected (K = 3: Avg-DPO, Eq. 5). rpo_alpha adds
    α x the chosen per-token NLL (TRL's RPO; not in the paper). -> losses (B,), chosen and rejected
    rewards (the latter γ-weighted for Avg-DPO)."""
    p, r = (logps / counts, ref_logps / counts) if name in LENGTH_NORM else (logps, ref_logps)
    loss, chosen, rejected = LOSSES[name](p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta)
    if p.shape[1] == 3:
        loss2, _, rejected2 = LOSSES[name](p[:, 0], p[:, 2], r[:, 0], r[:, 2], beta)
        loss, rejected = (
            gamma * loss + (1 - gamma) * loss2,
            gamma * rejected + (1 - gamma) * rejected2,
        )
    if rpo_alpha:  # keeps the chosen response likely: near-identical pairs otherwise pull both down
        loss = loss - rpo_alpha * logps[:, 0] / counts[:, 0]
    return loss, chosen, rejected


# -----------------------------------------------------------------------------
# RL (Eq. 2): per-token tensors are (N, L) with a bool `mask` of real response tokens


def masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x, mask):
    """Advantage normalisation: zero mean, unit variance over the real tokens (padding stays 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """GAE, right to left: δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}, V = 0 after the last
    real token. -> (advantages, returns = advantages + values)."""
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = (rewards[:, t] + gamma * nxt - values[:, t] + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def ppo_loss(
    lp, old_lp, adv, values, old_values, returns, mask, clip=0.2, clip_value=0.2, vf_coef=0.1
):
    """Clipped surrogate max(-A r, -A clip(r, 1±ε)), r = π/π_old per token, plus vf_coef x the
    clipped value loss ½ max((V - R)², (V_old + clip(V - V_old, ±ε_v) - R)²): token means per
    sequence, (N,); and the share of clipped tokens per sequence."""
    ratio = torch.exp(lp - old_lp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = old_values + (values - old_values).clamp(-clip_value, clip_value)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(pg, mask, -1) + vf_coef * masked_mean(vf, mask, -1), masked_mean(
        clipped, mask, -1
    ).detach()


def rloo_advantages(rewards):
    """(P, k) rewards, k samples per prompt -> A_i = R_i - mean_{j≠i} R_j, leave-one-out."""
    k = rewards.shape[1]
    return (rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)).detach()


def rloo_loss(logps, adv):
    """REINFORCE with the leave-one-out baseline: -A_i log π(y_i | x) per sample, (P, k)."""
    return -adv * logps
