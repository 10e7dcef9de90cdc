"""A token loop inside one ONNX graph: many decode steps, sampling included, per ONNX Runtime call (the flat LM's,
and the sentence-step renderer's within a segment).

Why: at batch 1 a decode step of a small model costs about as much outside the graph as inside it (building the
feeds, ONNX Runtime's per-call work, PyTorch's sampler between calls: ~0.4 ms a token, measured). Here an
exported step (``LMStep`` or ``RendererStep``, fp32 or int8) becomes the body of an ONNX ``Loop``: each iteration
takes its rotary rows (computed outside by the model's rule, one row per iteration) and builds its mask (keys
inside the window), runs the step (with the renderer's condition), picks the next token, feeds it back, and stops
after a stop id or a token at or above ``end_from`` (the renderer's end-of-segment symbol). Python runs once per
call. The graph is assembled in memory from the export (graph surgery with ``onnx.helper``: no exporter, no second
file to keep in step with the first).

The same tokens as ``engine.generate_ids``: greedy is the argmax of the logits; sampling is the one-sample form
of ``torch.multinomial`` (``argmax(probs / E)`` with ``E ~ Exp(1)`` drawn by the request's ``torch.Generator``,
one row of the vocabulary's size per token, as ``multinomial`` draws them; rows drawn for steps a stop made
unnecessary are given back, so the generator is where the per-token loop leaves it), with ``probs`` computed as
``sample_next`` does (divide by the temperature, top-k mask, softmax). Nucleus sampling and ALiBi models take the
per-token path.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sentcode.infer.ort import ort_session


CHUNK = 32  # flat LM: tokens per ONNX Runtime call (a stream's tokens arrive in bursts of this size)
_NO_WINDOW = 1 << 40


def _const(name: str, value, dtype=np.int64):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(value, dtype=dtype), name))


def _topk_branches(helper, TP):
    """``If`` branches: ``filtered`` is ``scaled`` with every logit below its row's k-th largest set to -inf, in the
    rows that asked for top-k (``lp_k`` [B, 1] per row, ``lp_row_top_k`` [B, 1])."""
    then = helper.make_graph(
        [helper.make_node("ReduceMax", ["lp_k"], ["lp_kmax_s"], keepdims=0),
         _const("lp_one_dim", [1]),
         helper.make_node("Reshape", ["lp_kmax_s", "lp_one_dim"], ["lp_kmax"]),
         helper.make_node("TopK", ["lp_scaled", "lp_kmax"], ["lp_kvals", "lp_kidx"], axis=-1),
         helper.make_node("Sub", ["lp_k", "lp_one"], ["lp_kpos"]),
         helper.make_node("GatherElements", ["lp_kvals", "lp_kpos"], ["lp_kth"], axis=1),
         helper.make_node("Less", ["lp_scaled", "lp_kth"], ["lp_below"]),
         helper.make_node("And", ["lp_below", "lp_row_top_k"], ["lp_drop"]),
         _const("lp_neg_inf", -np.inf, np.float32),
         helper.make_node("Where", ["lp_drop", "lp_neg_inf", "lp_scaled"], ["lp_masked"])],
        "topk", [], [helper.make_tensor_value_info("lp_masked", TP.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["lp_scaled"], ["lp_unmasked"])], "all", [],
                              [helper.make_tensor_value_info("lp_unmasked", TP.FLOAT, None)])
    return then, other


def loop_graph(step, cfg):
    """The decode loop around ``step`` (an ``onnx.ModelProto`` from ``LMStep`` or ``RendererStep``) for B rows that
    share positions (the batch decoder's right-aligned rows; ``lp_pad`` [B, P0] marks the cache's real keys)."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    g = step.graph
    L, kv, hd = cfg.n_layer, cfg.n_kv_head, cfg.d_model // cfg.n_head
    names = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.initializer}
    clash = sorted(n for n in names if n.startswith("lp_"))
    assert not clash, f"the step graph already uses names the loop needs: {clash[:3]}"
    past = [f"past_{k}_{i}" for i in range(L) for k in ("key", "value")]
    present = [f"present_{k}_{i}" for i in range(L) for k in ("key", "value")]
    conditioned = any(i.name == "cond" for i in g.input)
    then, other = _topk_branches(helper, TP)
    true = numpy_helper.from_array(np.array([True]), "lp_true")
    nodes = [
        _const("lp_one", 1), _const("lp_zero", 0), _const("lp_ax0", [0]), _const("lp_ax1", [1]),
        _const("lp_ax12", [1, 2]), _const("lp_row", [1, 1, -1]), _const("lp_half", [hd // 2]), _const("lp_flat", [-1]),
        # the step's inputs for one token per row: this iteration's rotary rows (shared positions), and the mask
        helper.make_node("Identity", ["lp_tok"], ["idx"]),
        helper.make_node("Shape", ["lp_tok"], ["lp_B"], start=0, end=1),
        helper.make_node("Concat", ["lp_B", "lp_ax1", "lp_half"], ["lp_rope_shape"], axis=0),
        helper.make_node("Unsqueeze", ["lp_iter", "lp_ax0"], ["lp_iterv"]),
        helper.make_node("Gather", ["lp_cos_rows", "lp_iterv"], ["lp_cos"]),
        helper.make_node("Gather", ["lp_sin_rows", "lp_iterv"], ["lp_sin"]),
        helper.make_node("Reshape", ["lp_cos", "lp_row"], ["lp_cos1"]),
        helper.make_node("Reshape", ["lp_sin", "lp_row"], ["lp_sin1"]),
        helper.make_node("Expand", ["lp_cos1", "lp_rope_shape"], ["cos"]),
        helper.make_node("Expand", ["lp_sin1", "lp_rope_shape"], ["sin"]),
        # keys: the cache's real ones (lp_pad), every key written since, and only those inside the window
        helper.make_node("Shape", ["past_key_0"], ["lp_cached"], start=2, end=3),
        helper.make_node("Add", ["lp_cached", "lp_one"], ["lp_n_keys_1"]),
        helper.make_node("Shape", ["lp_pad"], ["lp_p0"], start=1, end=2),
        helper.make_node("Sub", ["lp_n_keys_1", "lp_p0"], ["lp_new"]),
        helper.make_node("Concat", ["lp_B", "lp_new"], ["lp_new_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["lp_new_shape"], ["lp_new_keys"], value=true),
        helper.make_node("Concat", ["lp_pad", "lp_new_keys"], ["lp_real"], axis=1),
        helper.make_node("Squeeze", ["lp_n_keys_1"], ["lp_n_keys"]),
        helper.make_node("Range", ["lp_zero", "lp_n_keys", "lp_one"], ["lp_keys"]),
        helper.make_node("Sub", ["lp_n_keys", "lp_window"], ["lp_first_key"]),
        helper.make_node("GreaterOrEqual", ["lp_keys", "lp_first_key"], ["lp_inside"]),
        helper.make_node("And", ["lp_real", "lp_inside"], ["lp_seen"]),
        helper.make_node("Unsqueeze", ["lp_seen", "lp_ax12"], ["mask"]),
        *([helper.make_node("Identity", ["lp_cond"], ["cond"])] if conditioned else []),
        *g.node,
        # each row's next token, as sample_next picks it with the row's settings
        helper.make_node("Squeeze", ["logits", "lp_ax1"], ["lp_logits"]),
        helper.make_node("ArgMax", ["lp_logits"], ["lp_greedy"], axis=-1, keepdims=1),
        helper.make_node("Div", ["lp_logits", "lp_temperature"], ["lp_scaled"]),
        helper.make_node("If", ["lp_use_top_k"], ["lp_filtered"], then_branch=then, else_branch=other),
        helper.make_node("Softmax", ["lp_filtered"], ["lp_probs"], axis=-1),
        helper.make_node("Gather", ["lp_exp_noise", "lp_iter"], ["lp_e"], axis=0),
        helper.make_node("Div", ["lp_probs", "lp_e"], ["lp_ratio"]),
        helper.make_node("ArgMax", ["lp_ratio"], ["lp_sampled"], axis=-1, keepdims=1),
        helper.make_node("Where", ["lp_greedy_flag", "lp_greedy", "lp_sampled"], ["lp_next"]),
        # its log-probability under the unscaled distribution (what reranking sums)
        helper.make_node("LogSoftmax", ["lp_logits"], ["lp_logp"], axis=-1),
        helper.make_node("GatherElements", ["lp_logp", "lp_next"], ["lp_chosen"], axis=1),
        helper.make_node("Reshape", ["lp_chosen", "lp_flat"], ["lp_emitted_lp"]),
        # stop after any row's stop id, or a token at or above end_from
        helper.make_node("Equal", ["lp_next", "lp_stop_ids"], ["lp_hits"]),
        helper.make_node("Reshape", ["lp_next", "lp_flat"], ["lp_next_flat"]),
        helper.make_node("GreaterOrEqual", ["lp_next_flat", "lp_end_from"], ["lp_ended"]),
        helper.make_node("Cast", ["lp_hits"], ["lp_hits_i"], to=TP.INT64),
        helper.make_node("Cast", ["lp_ended"], ["lp_ended_i"], to=TP.INT64),
        helper.make_node("ReduceMax", ["lp_hits_i"], ["lp_hit"], keepdims=0),
        helper.make_node("ReduceMax", ["lp_ended_i"], ["lp_end"], keepdims=0),
        helper.make_node("Max", ["lp_hit", "lp_end"], ["lp_over_i"]),
        helper.make_node("Cast", ["lp_over_i"], ["lp_over"], to=TP.BOOL),
        helper.make_node("Not", ["lp_over"], ["lp_go_on"]),
        helper.make_node("Identity", ["lp_next"], ["lp_emitted"]),
    ]
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        nodes, "decode_step",
        [vi("lp_iter", TP.INT64, []), vi("lp_cond_in", TP.BOOL, []), vi("lp_tok", TP.INT64, None),
         *(vi(n, TP.FLOAT, None) for n in past)],
        [vi("lp_go_on", TP.BOOL, []), vi("lp_next", TP.INT64, None),
         *(vi(n, TP.FLOAT, None) for n in present), vi("lp_emitted", TP.INT64, None),
         vi("lp_emitted_lp", TP.FLOAT, None)])
    window = cfg.attn_window if cfg.attn_window is not None else _NO_WINDOW
    inits = [*g.initializer, numpy_helper.from_array(np.array(window, np.int64), "lp_window")]
    loop = helper.make_node("Loop", ["n_steps", "", "first_token", *(f"in_{n}" for n in past)],
                            ["last_token", *(f"out_{n}" for n in present), "tokens", "logprobs"], body=body)
    cache = ["rows", kv, "past", hd]
    inputs = [vi("n_steps", TP.INT64, []), vi("first_token", TP.INT64, ["rows", 1]),
              vi("lp_pad", TP.BOOL, ["rows", "past"]),
              vi("lp_cos_rows", TP.FLOAT, ["steps", hd // 2]), vi("lp_sin_rows", TP.FLOAT, ["steps", hd // 2]),
              vi("lp_temperature", TP.FLOAT, ["rows", 1]), vi("lp_greedy_flag", TP.BOOL, ["rows", 1]),
              vi("lp_use_top_k", TP.BOOL, []), vi("lp_row_top_k", TP.BOOL, ["rows", 1]),
              vi("lp_k", TP.INT64, ["rows", 1]), vi("lp_exp_noise", TP.FLOAT, ["steps", "rows", cfg.vocab_size]),
              vi("lp_stop_ids", TP.INT64, ["rows", "stops"]), vi("lp_end_from", TP.INT64, [1]),
              *(vi(f"in_{n}", TP.FLOAT, cache) for n in past)]
    if conditioned:
        inputs.append(vi("lp_cond", TP.FLOAT, [1, 1, cfg.d_model]))
    outer = helper.make_graph(
        [loop], "decode_loop", inputs,
        [vi("last_token", TP.INT64, None), *(vi(f"out_{n}", TP.FLOAT, None) for n in present),
         vi("tokens", TP.INT64, None), vi("logprobs", TP.FLOAT, None)],
        initializer=inits)
    return helper.make_model(outer, opset_imports=list(step.opset_import), ir_version=step.ir_version)


class DecodeLoop:
    """The loop graph of an ``OnnxLM``'s export (a flat LM or a renderer): ``run`` one call, ``generate`` the flat
    LM's ``generate_ids`` around it."""

    def __init__(self, lm, path):
        import onnx

        self.lm, self.cfg = lm, lm.cfg
        self.hd = self.cfg.d_model // self.cfg.n_head
        self.session = ort_session(loop_graph(onnx.load(str(path)), self.cfg).SerializeToString(), lm.threads,
                                   lm.loop_spin)
        self.past = [f"in_past_{k}_{i}" for i in range(self.cfg.n_layer) for k in ("key", "value")]

    @staticmethod
    def serves(cfg, top_p: float | None) -> bool:
        return cfg.pos == "rope" and (top_p is None or top_p >= 1.0)

    def empty_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, self.cfg.n_kv_head, 0, self.hd), np.float32)] * (2 * self.cfg.n_layer)

    def run(self, first: int, pos: int, cache: list[np.ndarray], n: int, temperature: float, top_k: int | None,
            generator: torch.Generator | None, stop_ids: tuple[int, ...] = (), end_from: int | None = None,
            cond: torch.Tensor | None = None) -> tuple[list[int], list[float], list[np.ndarray]]:
        """Feed ``first`` at position ``pos`` after ``cache`` (per layer: key, value arrays) and write up to ``n``
        tokens: (tokens, their log-probs, the cache after every token fed). The loop stops after a stop id or a
        token >= ``end_from``; that last token is returned but not fed, like any ``n``-th token."""
        tokens, logprobs, cache = self.run_rows([first], pos, cache, None, n, [(temperature, top_k)], [generator],
                                                [stop_ids], end_from, cond)
        return [t[0] for t in tokens], [lp[0] for lp in logprobs], cache

    def run_rows(self, first: list[int], pos: int, cache: list[np.ndarray], pad: np.ndarray | None, n: int,
                 settings: list[tuple[float, int | None]], generators: list, stop_ids: list[tuple[int, ...]],
                 end_from: int | None = None, cond: torch.Tensor | None = None):
        """``run`` for B rows sharing positions (``pad`` [B, cached] marks real cache keys; None: all), each with
        its own (temperature, top_k), generator and stop ids: (tokens per step [m][B], log-probs [m][B], cache).
        The loop stops after the first step where any row meets a stop."""
        V, B = self.cfg.vocab_size, len(first)
        greedy = [t == 0 or k == 1 for t, k in settings]
        top_k = [bool(k) and not g for (_, k), g in zip(settings, greedy)]
        kmax = max([min(k, V) for (_, k), t in zip(settings, top_k) if t] or [1])
        noise, states = [], []
        for g, gen in zip(greedy, generators):
            states.append(None if g else gen.get_state())
            noise.append(np.ones((n, V), np.float32) if g else torch.empty(n, V).exponential_(generator=gen).numpy())
        cos, sin = self.lm.rope_rows(pos, n)
        stops = max(len(s) for s in stop_ids) + 1
        feeds = {"n_steps": np.array(n, np.int64), "first_token": np.array(first, np.int64).reshape(B, 1),
                 "lp_pad": np.ones((B, cache[0].shape[2]), bool) if pad is None else np.ascontiguousarray(pad),
                 "lp_cos_rows": cos, "lp_sin_rows": sin, "lp_exp_noise": np.stack(noise, axis=1),
                 "lp_temperature": np.array([[1.0 if g else t] for (t, _), g in zip(settings, greedy)], np.float32),
                 "lp_greedy_flag": np.array(greedy).reshape(B, 1), "lp_use_top_k": np.array(any(top_k)),
                 "lp_row_top_k": np.array(top_k).reshape(B, 1),
                 "lp_k": np.array([[min(k, V) if t else kmax] for (_, k), t in zip(settings, top_k)], np.int64),
                 "lp_stop_ids": np.array([[*s] + [-1] * (stops - len(s)) for s in stop_ids], np.int64),
                 "lp_end_from": np.array([V if end_from is None else end_from], np.int64),
                 **dict(zip(self.past, cache))}
        if cond is not None:
            feeds["lp_cond"] = np.ascontiguousarray(cond.detach().float().numpy().reshape(1, 1, -1))
        out = self.session.run(None, feeds)
        tokens, logprobs = out[-2].reshape(-1, B).tolist(), out[-1].reshape(-1, B).tolist()
        if len(tokens) < n:  # give back the rows of noise of the steps not taken
            for gen, state in zip(generators, states):
                if state is not None:
                    gen.set_state(state)
                    torch.empty(len(tokens), V).exponential_(generator=gen)
        return tokens, logprobs, out[1:1 + len(self.past)]

    def prefill(self, ids: list[int]) -> list[np.ndarray]:
        """The cache of ``ids`` (positions 0..), as the loop's cache inputs."""
        if not ids:
            return self.empty_cache()
        cache = self.lm.new_cache()
        self.lm(torch.tensor([ids]), cache=cache, start_pos=0)
        return [t.numpy() for c in cache for t in (c.k, c.v)]

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                 generator: torch.Generator, stop_ids: tuple[int, ...]) -> Iterator[int]:
        """``engine.generate_ids`` with the cache: the same context policy, the same tokens."""
        ctx = self.cfg.max_seq_len
        ids, start, cache, made = list(prompt_ids), 0, None, 0
        while made < max_new_tokens:
            if len(ids) - start > ctx:  # the window jumps, as in engine.generate_ids
                start, cache = len(ids) - ctx // 2, None
            if cache is None:
                cache = self.prefill(ids[start:-1])
            n = min(CHUNK, max_new_tokens - made, ctx - (len(ids) - start) + 1)
            tokens, _, cache = self.run(ids[-1], len(ids) - 1 - start, cache, n, temperature, top_k, generator,
                                        stop_ids)
            for tok in tokens:
                ids.append(tok)
                made += 1
                yield tok
                if tok in stop_ids:
                    return
