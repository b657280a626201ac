"""Graphs on demand: the local server computes a prompt's graphs at chosen prefix lengths.

``circuit-tracer-matryoshka start-server --graph_file_dir D --model M --transcoder_set T``
loads the model once (``load_model_and_config``) and hands the server a ``GraphComputer``.
The page's prompt box then ``POST``s ``{"prompt": ..., "prefix_lens": [...]}`` to
``/compute/start``; ``GraphComputer.start`` checks it in full before anything runs (a
bad prompt or prefix length is one line back to the page, nothing is computed or
written) and attributes in a worker thread, one prefix length after another, so that
``/compute/status`` can report progress. The graphs are written with the same library
calls as ``circuit-tracer-matryoshka attribute`` (``graph_files.write_graph_files``:
all or nothing, the directory swapped in whole), only once every prefix length is done.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from contextlib import nullcontext
from pathlib import Path

from ..core.errors import MatryoshkaError, UsageError
from ..core.prefixes import check_prefix_lens, default_prefix_ladder

MAX_PROMPT_CHARS = 4000
# More graphs than this per prompt would keep the one worker busy for a long time.
MAX_PREFIX_LENS = 8


def load_model_and_config(transcoder_set: str, model: str | None, dtype=None):
    """The ``ReplacementModel`` (local dirs, GGUF or the offline SmolLM2 name) and the
    transcoder set's config."""
    from ..adapters.circuit_tracer.loading import load_transcoders
    from ..adapters.circuit_tracer.local_model import load_replacement_model

    kwargs = {} if dtype is None else {"dtype": dtype}
    transcoders, config = load_transcoders(transcoder_set, lazy_encoder=False, lazy_decoder=False, **kwargs)
    spec = model or config.get("model_name")
    if not spec:
        raise UsageError(f"--model is needed: the transcoder set {transcoder_set} names no model")
    return load_replacement_model(spec, transcoders, **kwargs), config


def prompt_slug(prompt: str) -> str:
    """``q-<first words>-<hash>``: readable, file-system safe, the same for the same prompt."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:32].strip("-")
    return f"q-{words or 'prompt'}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


def check_known_tokens(prompt: str, tokenizer) -> None:
    """Refuse a prompt that the tokenizer reads partly as its unknown token: the graph
    would explain a placeholder, not the text."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    unknown = [prompt[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if t == unk]
    if unknown:
        shown = ", ".join(repr(w) for w in dict.fromkeys(unknown))
        raise UsageError(
            f"the prompt has text the tokenizer does not know ({shown}); it would be read as the "
            f"unknown token {tokenizer.unk_token!r}: use other words"
        )


class GraphComputer:
    """Computes and writes one prompt's graphs at a time into ``graph_dir``.

    ``attribution`` holds circuit-tracer's ``attribute`` options (``max_n_logits``,
    ``batch_size``, ...); ``prefix_lens`` the lengths the page offers first (default: the
    nested sizes, else ``default_prefix_ladder``).
    """

    def __init__(self, model, config: dict, graph_dir, *, prefix_lens=None, node_threshold: float = 0.8,
                 edge_threshold: float = 0.98, **attribution):
        from ..adapters.circuit_tracer.loading import nested_sizes_of
        from ..adapters.circuit_tracer.prefix_transcoders import transcoder_width

        self.model, self.config, self.graph_dir = model, config, Path(graph_dir)
        self.width = transcoder_width(model.transcoders)
        self.nested_sizes = nested_sizes_of(config)
        if prefix_lens:
            self.prefix_lens = check_prefix_lens(prefix_lens, self.width, what="--prefix-len: prefix length")
        else:
            self.prefix_lens = default_prefix_ladder(self.width, self.nested_sizes or ())
        self.node_threshold, self.edge_threshold, self.attribution = node_threshold, edge_threshold, attribution
        self._lock = threading.Lock()
        self._job: dict | None = None
        self._thread: threading.Thread | None = None

    def describe(self) -> dict:
        """What ``/compute/status`` answers: the offer and the latest job."""
        with self._lock:
            job = dict(self._job) if self._job else None
        return {"available": True, "width": self.width, "prefix_lens": self.prefix_lens,
                "n_ctx": getattr(self.model.cfg, "n_ctx", None), "job": job}

    def check(self, request) -> tuple[str, list[int]]:
        """``(prompt, prefix lengths)`` of a ``/compute/start`` body, or ``UsageError``."""
        from ..adapters.circuit_tracer.attribution import check_prompt

        if not isinstance(request, dict):
            raise UsageError('the request must be a JSON object {"prompt": ..., "prefix_lens": [...]}')
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise UsageError(f"prompt {prompt!r} must be a string")
        if not prompt.strip():
            raise UsageError("the prompt is empty; type some text to attribute")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise UsageError(f"the prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
        lens = request.get("prefix_lens", self.prefix_lens)
        if not isinstance(lens, list):
            raise UsageError(f"prefix_lens {lens!r} must be a list of integers in 1..{self.width}")
        lens = check_prefix_lens(lens, self.width)
        if len(lens) > MAX_PREFIX_LENS:
            raise UsageError(f"{len(lens)} prefix lengths asked; at most {MAX_PREFIX_LENS} per prompt")
        check_known_tokens(prompt, self.model.tokenizer)
        check_prompt(prompt, self.model)
        return prompt, sorted(lens)

    def start(self, request) -> dict:
        """Check ``request`` and start computing; returns the new job. ``UsageError`` for a
        bad request, ``RuntimeError`` while another job runs."""
        prompt, lens = self.check(request)
        with self._lock:
            if self._job and self._job["state"] == "running":
                raise RuntimeError(f"graphs for {self._job['prompt']!r} are still being computed; wait for them")
            job_id = (self._job["id"] + 1) if self._job else 1
            slug = prompt_slug(prompt)
            self._job = {"id": job_id, "state": "running", "prompt": prompt, "prefix_lens": lens,
                         "done": 0, "total": len(lens), "current": lens[0], "slugs": [], "error": None}
            job = dict(self._job)
        self._thread = threading.Thread(target=self._run, args=(job_id, prompt, lens, slug), daemon=True)
        self._thread.start()
        return job

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until the running job ends (for scripts and tests); returns it."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.describe()["job"]

    def _update(self, job_id: int, **fields) -> None:
        with self._lock:
            if self._job and self._job["id"] == job_id:
                self._job.update(fields)

    def _run(self, job_id: int, prompt: str, lens: list[int], slug: str) -> None:
        from ..adapters.circuit_tracer.attribution import attribute_prefixes, reusing_setup_forward
        from ..adapters.circuit_tracer.hierarchy import write_hierarchy
        from ..adapters.circuit_tracer.prefix_transcoders import level_decoder_sizes
        from ..adapters.circuit_tracer.graph_files import (
            graph_file_entries,
            score_rows,
            write_graph_files,
            write_scores,
        )

        try:
            results = []
            # One prefix length per call, for the progress; the setup forward is still shared.
            reuse = reusing_setup_forward(self.model) if hasattr(self.model, "run_with_hooks") else nullcontext()
            with reuse:
                for i, p in enumerate(lens):
                    self._update(job_id, done=i, current=p)
                    results += attribute_prefixes(prompt, self.model, [p], **self.attribution)
            self._update(job_id, done=len(lens), current=None)
            rows = score_rows(results, self.width, self.nested_sizes, level_decoder_sizes(self.model))
            entries = graph_file_entries(slug, results, rows)
            # Supernodes from the nesting, as `attribute` writes them for several lengths.
            graphs = [(s, r.prefix_len) for (s, _, _), r in zip(entries, results)]
            annotate = (lambda tmp: write_hierarchy(tmp, graphs, self.model)) if len(lens) > 1 else None
            write_graph_files(entries, self.graph_dir, self.node_threshold, self.edge_threshold, annotate)
            write_scores(self.graph_dir / f"{slug}.scores.json", rows)
            self._update(job_id, state="done", slugs=[s for s, _, _ in entries])
        except MatryoshkaError as e:
            self._update(job_id, state="failed", error=(str(e).strip().splitlines() or [type(e).__name__])[0])
        except Exception as e:  # a bug or a model failure: the page says so, the server lives on
            logging.exception("computing graphs failed")
            first = (str(e).strip().splitlines() or [""])[0]
            self._update(job_id, state="failed", error=f"{type(e).__name__}: {first}")
