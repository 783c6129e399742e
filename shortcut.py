"""shortcut.py: a no-training baseline that is the shortcut an aligned model may have learned in the
world ("a usual partner is absent"), evaluated as a model by eval.py's world report (issue 31).

The alignment data switches existence negatives to the absent usual partner, and half of its scenes
are `broken`; so an aligned model can score by a text rule instead of by looking. This baseline
is that rule, applied to the question and answer text only, never to the scene:

- an existence question ("Is there a cup ...?", any phrasing of world.PHRASINGS) about a category
  that is some category's usual partner is answered "No, there is no cup." without looking. In this
  world every category has a usual partner, so it answers "no" to every existence question: its POPE
  F1 is 0 and its twin-test grounding 0 by construction (the floor an aligned model must beat);
- a description is the base model's, with every sentence dropped that names X after a sentence
  that named X's usual partner (the first of a pair named stays), so it never names both of a pair;
  the count sentence is left as the base model wrote it (a text rule cannot recount);
- every other question (colour, count, position, anything else) gets the base model's answer.

The base model does look at the image for descriptions and the other questions: the baseline is
"the base model plus the shortcut", which needs no training, so a row that only learned the rule
matches it. eval.answer calls `prepare`, `generate` and `tokenizer.decode`; they are here.

    python eval.py --model shortcut --world_seed 0           # over the shipped base model
    python eval.py --model shortcut:runs/base --world_seed 0  # over another base model
"""
import re

import world as W

# existence phrasings, train and held-out, as patterns that catch the category: "Is there (a|an) X ..."
EXIST = [re.compile(re.escape(p).replace(re.escape("{a}"), r"an? ([a-z]+)") + "$")
         for ps in W.PHRASINGS["exist"] for p in ps]
DESCRIBE = {p for ps in W.PHRASINGS["describe"] for p in ps}


def asked_about(question):
    """The category an existence question asks about, or None for any other question."""
    for pattern in EXIST:
        m = pattern.match(question.strip())
        if m and m[1] in W.PARTNER:
            return m[1]
    return None


def drop_second_of_pairs(text):
    """The description without every sentence that names X after an earlier sentence named X's
    usual partner (sentences end with '.'; a sentence naming no category is kept)."""
    kept, named = [], set()
    for sentence in re.findall(r"[^.]*\.?", text):
        said = W.mentioned(sentence)
        if any(W.PARTNER[c] in named for c in said):
            continue
        named |= said
        kept.append(sentence)
    return "".join(kept)


class Texts:
    """The tokenizer eval.answer decodes with: Shortcut.generate returns texts already."""

    def decode(self, text, skip_special_tokens=True):
        return text


class Shortcut:
    """The shortcut over a base model (a VLM or anything with its prepare / generate / tokenizer)."""

    def __init__(self, base):
        self.base = base
        self.tokenizer = Texts()
        self.template = getattr(base, "template", None)
        self.template_source = f"the base model's ({getattr(base, 'template_source', None)})"

    def eval(self):
        self.base.eval()
        return self

    def prepare(self, questions, images=None, template=None, device=None):
        """Keeps the questions: what to ask the base model is decided per question in generate."""
        return dict(questions=list(questions), images=images, template=template, device=device)

    def generate(self, questions, images=None, template=None, device=None, max_new_tokens=64, **sampling):
        """Texts, one per question: the rule's answer, or the base model's (descriptions filtered)."""
        out = [None] * len(questions)
        for j, q in enumerate(questions):
            if (c := asked_about(q)) is not None:
                out[j] = W.answer("exist", W.Scene(), c)  # "No, there is no c.": the scene is not read
        rest = [j for j, t in enumerate(out) if t is None]
        if rest:
            shown = [images[j] for j in rest] if images else None
            batch = self.base.prepare([questions[j] for j in rest], shown, template, device)
            ids = self.base.generate(**batch, max_new_tokens=max_new_tokens, **sampling)
            for j, x in zip(rest, ids):
                text = self.base.tokenizer.decode(x)
                out[j] = drop_second_of_pairs(text) if questions[j].strip() in DESCRIBE else text
        return out
