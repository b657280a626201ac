"""Judges and explainers for automated interpretability: the language model that answers
the questions of ``evaluation.autointerp`` and writes the latent explanations its
Detection Eval scores.

A judge is any callable ``judge(prompt, options) -> probabilities``: given a question and
the labels of its answers (``["A", "B"]``), the probability it gives each label. An
explainer is any callable ``explain(prompt) -> text``: a free-text reply, of which
``clean_explanation`` keeps the first line. Two backends come with the plugin; each is
both (``backend(prompt, options)`` judges, ``backend.explain(prompt)`` explains):

- ``ChatJudge``: an OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM,
  llama.cpp's server, ...), with the Python standard library only (``urllib``). The reply's
  first option label is its answer (probability 1); a reply naming none gets the uniform
  distribution, counted in ``unparsed``. Explanations are its reply at temperature 0.
- ``LocalJudge``: a local causal LM, by default the bundled SmolLM2-135M-Instruct
  (``offline.SMOLLM2``), scored by the next-token probability of each label after the
  chat prompt, so it always answers; it explains by greedy decoding. **A 135M-parameter model is a weak stand-in** for
  the large models these evaluations were designed for (Anthropic used Claude): its
  scores sit near chance and measure the pipeline more than the dictionary.
"""

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

import torch

from ..core.errors import UsageError

Judge = Callable[[str, Sequence[str]], Sequence[float]]
"""``judge(prompt, option_labels) -> one probability per label``."""

Explainer = Callable[[str], str]
"""``explain(prompt) -> the reply text``."""

SYSTEM_PROMPT = (
    "You are an expert at interpreting the features of language models. "
    "Answer with the letter of one option only."
)
"""The system message both backends send with a question."""

EXPLAIN_SYSTEM_PROMPT = (
    "You are an expert at interpreting the features of language models. "
    "Describe what a feature detects in a few words, on one line."
)
"""The system message both backends send when asked for an explanation."""

EXPLANATION_TOKENS = 32
"""Most tokens generated for one explanation: a phrase, as the Detection Eval wants."""

QUESTION_TOKENS = 8
"""Most tokens an endpoint may reply to a question: its letter and a little slack."""

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
"""The environment variable ``ChatJudge`` reads its API key from (none sent if unset)."""


def parse_choice(text: str, options: Sequence[str]) -> list[float] | None:
    """One-hot on the first option label that stands alone in ``text``; None if none does."""
    pattern = r"\b(" + "|".join(re.escape(o) for o in options) + r")\b"
    m = re.search(pattern, text)
    if m is None:
        return None
    return [float(o == m.group(1)) for o in options]


def clean_explanation(text: str) -> str:
    """The reply's first non-empty line, without a leading "Explanation:" or quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(explanation|description|feature|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip().strip("\"'`").strip()


class ChatJudge:
    """An OpenAI-compatible chat endpoint: POST ``{url}/chat/completions`` at temperature 0.

    ``url`` is the API base (e.g. ``https://api.openai.com/v1``); the key, if any, comes
    from the environment variable ``api_key_env`` and is sent as a Bearer token.
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = DEFAULT_API_KEY_ENV, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--explainer-url {url!r} is not allowed; expected an http:// or https:// URL")
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = os.environ.get(api_key_env)
        self.timeout = timeout
        self.unparsed = 0

    def complete(self, prompt: str, *, system: str = SYSTEM_PROMPT, max_tokens: int = QUESTION_TOKENS) -> str:
        """The endpoint's reply text to ``prompt``."""
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read())
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            raise UsageError(f"explainer endpoint {self.url} answered HTTP {e.code} ({e.reason})") from None
        except (urllib.error.URLError, OSError) as e:
            raise UsageError(f"cannot reach the explainer endpoint {self.url}: {e}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise UsageError(f"explainer endpoint {self.url} did not answer an OpenAI chat completion") from None

    def __call__(self, prompt: str, options: Sequence[str]) -> list[float]:
        choice = parse_choice(self.complete(prompt), options)
        if choice is None:
            self.unparsed += 1
            return [1 / len(options)] * len(options)
        return choice

    def explain(self, prompt: str) -> str:
        return clean_explanation(self.complete(prompt, system=EXPLAIN_SYSTEM_PROMPT, max_tokens=EXPLANATION_TOKENS))


class LocalJudge:
    """A local causal LM (default SmolLM2-135M-Instruct) that picks the likeliest label."""

    def __init__(self, model: str = "smollm2", *, device: str = "cpu"):
        from ..offline import load_pretrained, load_tokenizer

        self.lm = load_pretrained(model, device=device)
        self.tokenizer = load_tokenizer(model)
        self.unparsed = 0  # never: every label gets a probability

    def _label_id(self, label: str) -> int:
        # After "Answer:" the label is the next word: its space-prefixed first token.
        return self.tokenizer(" " + label, add_special_tokens=False)["input_ids"][0]

    def _chat_ids(self, system: str, prompt: str, reply_start: str = "") -> torch.Tensor:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text + reply_start, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return ids.to(self.lm.device)

    @torch.no_grad()
    def __call__(self, prompt: str, options: Sequence[str]) -> list[float]:
        logits = self.lm(input_ids=self._chat_ids(SYSTEM_PROMPT, prompt, "Answer:")).logits[0, -1].float()
        label_logits = logits[[self._label_id(o) for o in options]]
        return torch.softmax(label_logits, dim=0).tolist()

    @torch.no_grad()
    def explain(self, prompt: str) -> str:
        ids = self._chat_ids(EXPLAIN_SYSTEM_PROMPT, prompt)
        pad = self.tokenizer.pad_token_id
        out = self.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=EXPLANATION_TOKENS, do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id if pad is None else pad,  # a pad id of 0 is a real id
        )
        return clean_explanation(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
