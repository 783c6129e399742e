"""losses.py: log-probabilities and the training objectives, as pure functions (paper §3).

Every loss takes per-sequence (or per-token) log-probs computed once, in fp32, and returns per-example losses; the
training scripts average them. Equations are cited inline.
"""
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Log-probs: shift by one, -100 marks positions that are not scored (prompt, image, padding)


def token_logps(logits, labels):
    """(B, T, V) logits and (B, T) labels -> (B, T-1) log p(label_t | x_<t) in fp32, 0 where the label is -100."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    lp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T-1)
    return lp * (labels != -100)


def sequence_logps(logits, labels):
    """Sum of the response tokens' log-probs, one per sequence: (B,)."""
    return token_logps(logits, labels).sum(-1)

# -----------------------------------------------------------------------------
# Objectives


def sft_loss(logits, labels):
    """Mean negative log-likelihood over all scored tokens of the batch (a scalar)."""
    n = (labels[:, 1:] != -100).sum().clamp(min=1)
    return -token_logps(logits, labels).sum() / n
