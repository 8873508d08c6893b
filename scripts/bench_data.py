"""Data pipeline throughput: tokenization (ours vs datasets.map + HF tokenizers) and the loader.

    python scripts/bench_data.py [--repeat 2] [--workers 2]

Corpus: the embedded stdlib corpus (3.6 MB) repeated ``--repeat`` times, as jsonl. Both tokenization
paths use the same BPE (the shipped 4,096-token K2-style BPE; the HF tokenizer is rebuilt from its
ranks) and the script checks they produce the same ids. The loader runs k2_small's shape (seq 4096)
and is compared with what one H200 can consume training k2_small at the matmul ceiling.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def k2_small_tokens_per_s_bound(seq_len: int, peak_flops: float = 788e12) -> float:
    """Tokens/s one H200 could train k2_small at its measured bf16 matmul ceiling (docs/performance.md#anchors)."""
    import yaml

    m = yaml.safe_load((Path(__file__).parents[1] / "conf/model/k2_small.yaml").read_text())
    d, h = m["hidden_size"], m["num_attention_heads"]
    dn, dr, dv = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
    attn = d * m["q_lora_rank"] + m["q_lora_rank"] * h * (dn + dr) + d * (m["kv_lora_rank"] + dr)
    attn += m["kv_lora_rank"] * h * (dn + dv) + h * dv * d
    expert = 3 * d * m["moe_intermediate_size"]
    moe = (m["num_experts_per_tok"] + m["n_shared_experts"]) * expert + m["n_routed_experts"] * d
    dense = 3 * d * m["intermediate_size"]
    n_moe = m["num_hidden_layers"] - m["first_k_dense_replace"]
    active = m["num_hidden_layers"] * attn + m["first_k_dense_replace"] * dense + n_moe * moe + m["vocab_size"] * d
    flops = 6 * active + 6 * m["num_hidden_layers"] * seq_len * h * (dn + dr + dv) / 2
    return peak_flops / flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    import datasets
    import numpy as np

    from k2train.config import DataConfig
    from k2train.data_pipeline.embedded import embedded_documents, embedded_tokenizer
    from k2train.data_pipeline.indexed import IndexedDataset
    from k2train.data_pipeline.loader import build_data_loader
    from k2train.data_pipeline.prepare import prepare
    from k2train.data_pipeline.train_tokenizer import build_hf_tokenizer

    datasets.disable_progress_bars()
    tok = embedded_tokenizer()
    hf = build_hf_tokenizer(tok)
    docs = list(embedded_documents()) * args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6

        t0 = time.perf_counter()
        prepare([str(src)], f"{tmp}/ours", "embedded", workers=args.workers, progress=False)
        t_ours = time.perf_counter() - t0
        rows.append((
            "tokenize: k2train prepare (datasets stream -> tiktoken procs -> .bin/.idx)",
            f"{mb / t_ours:.2f} MB/s", f"{t_ours:.1f} s",
        ))

        eos = tok.eos_id

        def encode(batch):
            return {"ids": [e.ids + [eos] for e in hf.encode_batch(batch["text"])]}

        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=f"{tmp}/hf_cache")
        mapped = ds.map(encode, batched=True, batch_size=256, num_proc=args.workers, remove_columns=["text"])
        t_hf = time.perf_counter() - t0
        rows.append((
            f"tokenize: datasets.map(num_proc={args.workers}) + HF tokenizers encode_batch",
            f"{mb / t_hf:.2f} MB/s", f"{t_hf:.1f} s",
        ))

        ours = IndexedDataset(f"{tmp}/ours")
        same = len(ours) == len(mapped) and all(np.array_equal(ours.document(i), mapped[i]["ids"]) for i in range(len(ours)))
        rows.append(("same token ids in both paths", str(same), f"{len(ours):,} docs, {ours.num_tokens:,} tokens"))

        t0 = time.perf_counter()
        tok.encode_batch(docs, num_threads=args.workers)
        t_tt = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf.encode_batch(docs)
        t_hfe = time.perf_counter() - t0
        rows.append(("encode only: tiktoken (K2Tokenizer.encode_batch)", f"{mb / t_tt:.2f} MB/s", ""))
        rows.append(("encode only: HF tokenizers encode_batch", f"{mb / t_hfe:.2f} MB/s", ""))

        for seq_len, mbs in ((4096, 4), (128, 8)):
            cfg = DataConfig(cache_dir=f"{tmp}/cache", prefetch=8)
            loader = build_data_loader(cfg, tok, seq_len, mbs, 0, 1, 163840)
            next(loader)
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                next(loader)
            rate = n * mbs * seq_len / (time.perf_counter() - t0)
            loader.close()
            rows.append((f"loader tokens/s, seq {seq_len}, micro-batch {mbs}, prefetch thread", f"{rate:,.0f}", ""))
    bound = k2_small_tokens_per_s_bound(4096)
    rows.append(("one H200 training k2_small at 788 TFLOP/s (upper bound)", f"{bound:,.0f} tokens/s", "6N + attention FLOPs"))

    width = max(len(r[0]) for r in rows)
    print(f"corpus: {mb:.1f} MB, {len(docs):,} documents; {os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")


if __name__ == "__main__":
    main()
