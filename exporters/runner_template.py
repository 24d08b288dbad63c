"""Minimal runner shipped in every edgesvd bundle: needs only onnxruntime, numpy and tokenizers.

Encoders:  python run.py "first sentence" "second sentence"   → mean-pooled embeddings (+ cosine)
Decoders:  python run.py "Once upon a time" --max-new-tokens 32 → greedy continuation (KV cache)
Add --json for machine-readable output, --provider CUDAExecutionProvider to run on a GPU.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def load(provider):
    manifest = json.loads((HERE / "manifest.json").read_text())
    sess = ort.InferenceSession(str(HERE / "model.onnx"), providers=[provider])
    tok = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    return manifest, sess, tok


def embed(sess, tok, texts):
    """Mean-pooled embeddings of `texts` (the model's sentence_embedding output when it has one)."""
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0)
    tok.enable_truncation(512)
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    names = [i.name for i in sess.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    if "sentence_embedding" in outs:
        return outs["sentence_embedding"]
    m = mask[..., None].astype(np.float32)
    return (outs["last_hidden_state"] * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def generate(sess, tok, prompt, max_new_tokens, eos_id=None):
    """Greedy decoding with the KV cache: one prefill, then one token per step."""
    ids = tok.encode(prompt).ids
    inputs = {i.name: i for i in sess.get_inputs()}
    past = {}
    for name, inp in inputs.items():
        if name.startswith("past_key_values"):
            past[name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=_NP.get(inp.type, np.float32))
    out_names = [o.name for o in sess.get_outputs()]
    new, step_ids, total = [], ids, len(ids)
    for _ in range(max_new_tokens):
        start = total - len(step_ids)
        feed = {"input_ids": np.array([step_ids], dtype=np.int64),
                "attention_mask": np.ones((1, total), dtype=np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(start, total, dtype=np.int64)[None]
        outs = dict(zip(out_names, sess.run(None, feed)))
        nxt = int(outs["logits"][0, -1].argmax())
        new.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        step_ids, total = [nxt], total + 1
    return ids, new


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    manifest, sess, tok = load(args.provider)
    if "logits" not in {o.name for o in sess.get_outputs()}:  # an encoder: the graph says what it computes
        emb = embed(sess, tok, args.texts)
        result = {"embeddings": emb.tolist()}
        if len(args.texts) == 2:
            a, b = emb[0], emb[1]
            result["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"embeddings: {emb.shape}")
            if "cosine" in result:
                print(f"cosine: {result['cosine']:.4f}")
        return
    eos = manifest["model"].get("eos_token_id")
    prompt_ids, new = generate(sess, tok, args.texts[0], args.max_new_tokens, eos)
    if args.json:
        print(json.dumps({"prompt_ids": prompt_ids, "new_ids": new}))
    else:
        print(tok.decode(prompt_ids + new))


if __name__ == "__main__":
    main()
