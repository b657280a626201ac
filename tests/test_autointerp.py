"""Automated interpretability: datasets, scoring against known judges and explainers, the
HTTP judge against a real local server, the bundled SmolLM2 judge, and matryoshka-eval
--autointerp."""

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save_file

from matryoshka_plugin import MatryoshkaSparseCoder, MatryoshkaSparseCoderConfig
from matryoshka_plugin.cli.eval import main
from matryoshka_plugin.core.errors import UsageError
from matryoshka_plugin.evaluation.autointerp import (
    autointerp,
    contrast_pairs,
    contrastive_questions,
    detection_questions,
    explanation_prompt,
    score,
    silent_contexts,
    sort_questions,
    top_contexts,
)
from matryoshka_plugin.evaluation.explainers import (
    EXPLAIN_SYSTEM_PROMPT,
    EXPLANATION_TOKENS,
    ChatJudge,
    LocalJudge,
    clean_explanation,
    parse_choice,
)

from cli_errors import fails_in_one_line
from tiny import WORDS, build_tiny_llama

N_LATENTS = 16
LEVELS = [4, 16]
FILLER = ["x"]


def synthetic_corpus(n_seq: int = 64, seq_len: int = 12, seed: int = 0):
    """Token strings and activations where latent j fires on word ``w{j}`` only."""
    rng = random.Random(seed)
    tokens = [[" " + rng.choice([f"w{j}" for j in range(N_LATENTS)] + FILLER * 8) for _ in range(seq_len)]
              for _ in range(n_seq)]
    acts = torch.zeros(n_seq, seq_len, N_LATENTS)
    for s, seq in enumerate(tokens):
        for p, t in enumerate(seq):
            if t != " x":
                acts[s, p, int(t[2:])] = 1 + rng.random()
    return tokens, acts


def marked(block: str) -> set[str]:
    return set(re.findall(r"\[\[\s*(\w+)\]\]", block))


def sort_oracle(prompt: str, options) -> list[float]:
    """Answers from the prompt alone: the feature whose examples mark the held-out token."""
    a = marked(prompt.split("Feature A:")[1].split("Feature B:")[0])
    held_out = marked(prompt.split("Which feature fires on this excerpt?")[1])
    return [1.0, 0.0] if held_out <= a else [0.0, 1.0]


def contrast_oracle(prompt: str, options) -> list[float]:
    """The prompt holding the word the feature's examples mark."""
    word = marked(prompt.split("Two prompts")[0]).pop()
    first = prompt.split("\nA: ")[1].split("\nB: ")[0]
    return [1.0, 0.0] if word in first.split() else [0.0, 1.0]


def explain_oracle(prompt: str) -> str:
    """The words the shown examples mark, as an explanation."""
    return "the words " + ", ".join(sorted(marked(prompt)))


def detect_oracle(prompt: str, options) -> list[float]:
    """Yes (A) if the excerpt holds a word the explanation names."""
    named = set(prompt.split('explained as: "the words ')[1].split('"')[0].split(", "))
    excerpt = set(prompt.split("Excerpt:\n")[1].split("\n\n")[0].split())
    return [1.0, 0.0] if named & excerpt else [0.0, 1.0]


def uniform(prompt, options):
    return [0.5, 0.5]


def always_yes(prompt, options):
    return [1.0, 0.0]


def test_top_contexts_are_the_strongest_one_per_sequence():
    tokens, acts = synthetic_corpus()
    contexts = top_contexts(acts, tokens, 6, window=(2, 1))
    for j, ctx in enumerate(contexts):
        assert 0 < len(ctx) <= 6
        assert all(marked(c) == {f"w{j}"} for c in ctx)
    best = acts.max(dim=1).values[:, 3].sort(descending=True).values
    assert len(contexts[3]) == min(6, int((best > 0).sum()))


def test_sort_eval_is_deterministic_perfect_for_an_oracle_and_chance_for_noise():
    tokens, acts = synthetic_corpus()
    contexts = top_contexts(acts, tokens, 8)
    questions = sort_questions(contexts, LEVELS, latents_per_level=4, examples=4, seed=1)
    assert questions == sort_questions(contexts, LEVELS, latents_per_level=4, examples=4, seed=1)
    assert {q.level for q in questions} == {0, 1}
    assert all(set(q.latents) <= set(range(*[(0, 4), (4, 16)][q.level])) for q in questions)
    assert [r["accuracy"] for r in score(questions, sort_oracle, LEVELS)] == [1.0, 1.0]
    assert [r["p_correct"] for r in score(questions, uniform, LEVELS)] == [0.5, 0.5]
    rng = random.Random(0)
    many = sort_questions(contexts, [16], latents_per_level=16, examples=4, seed=2) * 8
    noise = score(many, lambda p, o: [1.0, 0.0] if rng.random() < 0.5 else [0.0, 1.0], [16])[0]
    assert noise["n_questions"] == 8 * 8 * 8
    assert 0.4 < noise["accuracy"] < 0.6  # 512 coin flips: 4.5 standard deviations


def test_contrastive_eval_perfect_for_an_oracle():
    tokens, acts = synthetic_corpus()
    contexts = top_contexts(acts, tokens, 8)
    texts = [f"the w{j} and the x w{(j + 5) % N_LATENTS} x x" for j in range(N_LATENTS)]
    swaps = {f"w{j}": f"w{(j + 1) % N_LATENTS}" for j in range(0, N_LATENTS, 2)}
    pairs = contrast_pairs(texts, 10, words=swaps, words_after=1)
    assert len(pairs) == 10 and all(len(a.split()) == len(b.split()) for a, b in pairs)
    assert all(sum(u != v for u, v in zip(a.split(), b.split())) == 1 for a, b in pairs)

    def activations(text):
        words = text.split()
        ids = torch.tensor([hash(w) % 1000 for w in words])
        a = torch.zeros(len(words), N_LATENTS)
        for p, w in enumerate(words):
            if w.startswith("w"):
                a[p, int(w[1:])] = 1.0
        return ids, a

    questions = contrastive_questions(pairs, activations, contexts, LEVELS, seed=0)
    assert questions == contrastive_questions(pairs, activations, contexts, LEVELS, seed=0)
    assert questions and all(r["accuracy"] in (1.0, None) for r in score(questions, contrast_oracle, LEVELS))
    assert {q.answer for q in questions} == {0, 1}  # the right prompt is not always A


def detection(tokens, acts, explain, levels=LEVELS, seed=0, latents_per_level=4):
    g = torch.Generator().manual_seed(seed)
    return detection_questions(
        top_contexts(acts, tokens, 8), top_contexts(acts, tokens, 8, mark=False),
        lambda latents: silent_contexts(acts, tokens, latents, 4, g), levels, explain,
        latents_per_level=latents_per_level, examples=4, seed=seed,
    )


def test_silent_contexts_never_hold_the_latent_and_are_deterministic():
    tokens, acts = synthetic_corpus()
    draw = lambda: silent_contexts(acts, tokens, [2, 9], 5, torch.Generator().manual_seed(3), window=(4, 2))  # noqa: E731
    windows = draw()
    assert windows == draw()
    for j, texts in windows.items():
        assert len(texts) == 5 and len(set(texts)) == 5
        assert all(len(t.split()) == 7 and f"w{j}" not in t.split() and "[[" not in t for t in texts)


def test_unmarked_top_contexts_are_as_long_as_silent_windows():
    tokens, acts = synthetic_corpus(seq_len=12)
    acts[:, :, 5] = 0
    acts[:4, 0, 5] = 9.0  # latent 5's strongest activations sit on the first token
    acts[4:8, 11, 5] = 8.0  # and then on the last
    marked_ctx = top_contexts(acts, tokens, 8, window=(4, 2))
    plain = top_contexts(acts, tokens, 8, window=(4, 2), mark=False)
    words = lambda c: c.replace("[[", " ").replace("]]", "").split()  # noqa: E731
    assert [len(words(c)) for c in marked_ctx[5]] == [3] * 4 + [5] * 4  # cut at the sequence's ends
    assert all(len(words(c)) == 7 for ctx in plain for c in ctx)  # the silent windows' length
    # Shifted, not other text: they start at their sequence's first token.
    assert sorted(c.split()[0] for c in plain[5][:4]) == sorted(tokens[s][0].strip() for s in range(4))
    # Away from the ends the two are the same text, marks aside.
    middle = [(m, u) for ctx_m, ctx_u in zip(marked_ctx, plain) for m, u in zip(ctx_m, ctx_u) if len(words(m)) == 7]
    assert middle and all(m.replace("[[", "").replace("]]", "") == u for m, u in middle)


def test_detection_eval_scores_the_explanation():
    tokens, acts = synthetic_corpus()
    questions, explanations = detection(tokens, acts, explain_oracle)
    assert (questions, explanations) == detection(tokens, acts, explain_oracle)
    assert [e["explanation"] for e in explanations] == [f"the words w{e['latent']}" for e in explanations]
    assert {e["level"] for e in explanations} == {0, 1}
    assert all("[[" not in q.prompt.split("Excerpt:")[1] for q in questions)  # the excerpts are unmarked
    per_latent = {e["latent"]: [q.answer for q in questions if q.latents == (e["latent"],)] for e in explanations}
    assert all(sorted(a) == [0] * 4 + [1] * 4 for a in per_latent.values())  # 4 positives, 4 negatives
    # A right explanation is perfect, a wrong one (another latent's word) is not; a judge
    # that always says yes, or ignores the question, is at chance.
    assert [r["accuracy"] for r in score(questions, detect_oracle, LEVELS)] == [1.0, 1.0]
    wrong, _ = detection(tokens, acts, lambda p: "the words w" + str((int(marked(p).pop()[1:]) + 1) % N_LATENTS))
    assert all(r["accuracy"] < 0.75 for r in score(wrong, detect_oracle, LEVELS))
    assert [r["accuracy"] for r in score(questions, always_yes, LEVELS)] == [0.5, 0.5]
    assert [r["p_correct"] for r in score(questions, uniform, LEVELS)] == [0.5, 0.5]


def test_detection_eval_skips_latents_that_fire_everywhere():
    tokens, acts = synthetic_corpus()
    acts[:, 0, 1] = 5.0  # latent 1 fires in every sequence: no silent window to ask about
    _, explanations = detection(tokens, acts, explain_oracle, levels=[4], latents_per_level=4)
    assert sorted(e["latent"] for e in explanations) == [0, 2, 3]


def test_clean_explanation_keeps_the_first_line():
    assert clean_explanation('\n  Explanation: "the word she"\nBecause ...') == "the word she"
    assert clean_explanation("`plural nouns`") == "plural nouns"
    assert clean_explanation("") == ""


def test_a_judge_must_answer_every_option():
    tokens, acts = synthetic_corpus()
    questions = sort_questions(top_contexts(acts, tokens, 8), LEVELS)
    with pytest.raises(UsageError, match="gave 1 probabilities for 2 options"):
        score(questions, lambda p, o: [1.0], LEVELS)


# -- the HTTP judge, against a real server -----------------------------------------------------


class ChatServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions answering with the sort oracle."""

    seen: list = []
    reply = None  # a fixed reply text, else the oracle's letter
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatServer.seen.append((self.path, self.headers.get("Authorization"), body))
        if ChatServer.status != 200:
            self.send_error(ChatServer.status)
            return
        prompt = body["messages"][-1]["content"]
        if ChatServer.reply:
            text = ChatServer.reply
        elif body["messages"][0]["content"] == EXPLAIN_SYSTEM_PROMPT:
            text = "Explanation: " + explain_oracle(prompt) + "\nThese words recur."
        else:
            oracle = detect_oracle if "Excerpt:" in prompt else sort_oracle
            text = "The answer is " + "AB"[oracle(prompt, "AB").index(1.0)] + "."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    ChatServer.seen, ChatServer.reply, ChatServer.status = [], None, 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_http_judge_scores_like_its_server(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    tokens, acts = synthetic_corpus()
    questions = sort_questions(top_contexts(acts, tokens, 8), LEVELS)
    judge = ChatJudge(server, "oracle", api_key_env="MY_KEY")
    assert [r["accuracy"] for r in score(questions, judge, LEVELS)] == [1.0, 1.0]
    path, auth, body = ChatServer.seen[0]
    assert (path, auth, body["model"], body["temperature"]) == ("/v1/chat/completions", "Bearer secret", "oracle", 0)
    assert judge.unparsed == 0


def test_http_explainer_and_judge_score_the_detection_eval_like_the_oracles(server):
    tokens, acts = synthetic_corpus()
    judge = ChatJudge(server, "oracle")
    questions, explanations = detection(tokens, acts, judge.explain)
    assert explanations == detection(tokens, acts, explain_oracle)[1]  # the reply's first line, label cut
    assert [r["accuracy"] for r in score(questions, judge, LEVELS)] == [1.0, 1.0]
    explain_bodies = [b for _, _, b in ChatServer.seen if b["messages"][0]["content"] == EXPLAIN_SYSTEM_PROMPT]
    assert len(explain_bodies) == len(explanations)
    assert all(b["max_tokens"] == EXPLANATION_TOKENS and b["temperature"] == 0 for b in explain_bodies)


def test_http_judge_unparsed_reply_is_uniform_and_counted(server):
    ChatServer.reply = "I cannot tell."
    judge = ChatJudge(server, "m")
    assert judge("q", ["A", "B"]) == [0.5, 0.5] and judge.unparsed == 1


def test_http_judge_errors_are_one_usage_error(server):
    ChatServer.status = 500
    with pytest.raises(UsageError, match="answered HTTP 500"):
        ChatJudge(server, "m")("q", ["A", "B"])
    with pytest.raises(UsageError, match="cannot reach"):
        ChatJudge("http://127.0.0.1:9/v1", "m", timeout=5)("q", ["A", "B"])
    with pytest.raises(UsageError, match="expected an http"):
        ChatJudge("ftp://x", "m")


def test_parse_choice_takes_the_first_standalone_label():
    assert parse_choice("B. Because A is wrong", ["A", "B"]) == [0.0, 1.0]
    assert parse_choice("Answer: A", ["A", "B"]) == [1.0, 0.0]
    assert parse_choice("Absolutely", ["A", "B"]) is None


# -- on a model, and the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("autointerp")
    llama = build_tiny_llama(root / "llama")
    torch.manual_seed(0)
    cfg = MatryoshkaSparseCoderConfig(num_latents=16, k=4, matryoshka=True, nested_sizes=[4, 16])
    coder = MatryoshkaSparseCoder(16, cfg)
    coder.save_to_disk(root / "run" / "layers.0.mlp")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    save_file({"inputs": torch.randn(100, 16)}, str(root / "data.safetensors"))
    return root, llama, coder, corpus


def test_autointerp_on_a_model_is_deterministic(tiny_setup):
    from matryoshka_plugin.offline import load_pretrained, load_tokenizer

    root, llama, coder, corpus = tiny_setup
    model, tok = load_pretrained(llama), load_tokenizer(llama)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    run = lambda judge: autointerp(model, tok, coder, 0, texts, judge, n_tokens=1024, seq_len=16,  # noqa: E731
                                   n_pairs=8, contrast_words={"big": "small", "red": "blue"},
                                   explainer=lambda prompt: "colours")
    a, b = run(uniform), run(uniform)
    assert a == b
    assert [(r["start"], r["end"]) for r in a["sort_eval"]] == [(0, 4), (4, 16)]
    assert a["settings"]["contrast_pairs"] == 4  # one per text: each text is one sentence
    asked = [r for r in a["sort_eval"] + a["contrastive_eval"] + a["detection_eval"] if r["n_questions"]]
    assert asked and all(r["accuracy"] == 0.5 for r in asked)
    assert a["explanations"] and {e["explanation"] for e in a["explanations"]} == {"colours"}
    yes = run(always_yes)["detection_eval"]
    assert [r["accuracy"] for r in yes if r["n_questions"]] == [0.5] * sum(1 for r in yes if r["n_questions"])
    with pytest.raises(UsageError, match="cannot explain latents; pass explainer="):
        autointerp(model, tok, coder, 0, texts, uniform, n_tokens=1024, seq_len=16)


def test_cli_writes_the_autointerp_section(tiny_setup, server, tmp_path):
    root, llama, _, corpus = tiny_setup
    out = tmp_path / "eval.json"
    rc = main([str(root / "run"), "--data", str(root / "data.safetensors"), "--out", str(out), "--rsa-samples", "0",
               "--autointerp", "--autointerp-model", str(llama), "--autointerp-corpus", str(corpus),
               "--autointerp-tokens", "1024", "--autointerp-pairs", "4", "--explainer-url", server])
    assert rc == 0
    section = json.loads(out.read_text())["autointerp"]
    assert section["judge"] == server
    assert [(r["start"], r["end"]) for r in section["sort_eval"]] == [(0, 4), (4, 16)]
    assert [(r["start"], r["end"]) for r in section["detection_eval"]] == [(0, 4), (4, 16)]
    assert section["explanations"] and all(e["explanation"].startswith("the words ") for e in section["explanations"])
    assert any(b["messages"][0]["content"] == EXPLAIN_SYSTEM_PROMPT for _, _, b in ChatServer.seen)


def test_local_judge_answers_and_explains_with_the_bundled_smollm2():
    judge = LocalJudge()
    probs = judge("Which letter comes first in the alphabet? A: A, B: B. Answer A or B.", ["A", "B"])
    assert len(probs) == 2 and abs(sum(probs) - 1) < 1e-5
    prompt = explanation_prompt(["She was very [[happy]] to see him", "a [[happy]] day", "so [[happy]] and gay"])
    explanation = judge.explain(prompt)
    assert explanation == judge.explain(prompt)  # greedy decoding
    assert explanation and "\n" not in explanation and len(explanation) < 400


@pytest.mark.parametrize("extra, match", [
    (["--autointerp-latents", "1"], "--autointerp-latents 1 must be at least 2"),
    (["--autointerp-tokens", "0"], "--autointerp-tokens 0 must be at least 1"),
    (["--autointerp-pairs", "0"], "--autointerp-pairs 0 must be at least 1"),
    (["--autointerp-corpus", "/nonexistent"], "--autointerp-corpus /nonexistent holds no .txt files"),
    (["--explainer-url", "localhost:8000"], "--explainer-url 'localhost:8000' is not allowed"),
])
def test_cli_bad_autointerp_values_are_one_line_without_output(tiny_setup, tmp_path, capsys, extra, match):
    root, _, _, _ = tiny_setup
    argv = [str(root / "run"), "--data", str(root / "data.safetensors"), "--out", str(tmp_path / "e.json"),
            "--autointerp", *extra]
    fails_in_one_line(main, capsys, argv, match)
    assert list(tmp_path.iterdir()) == []
