"""Search an embedding output by meaning: ``python -m jobs.search --help``.

Queries are embedded with the model and settings recorded in the output's Parquet metadata,
and compared by cosine with every committed vector (exact, streamed with bounded memory) or
through an HNSW index built with ``--build-index``.

Exit status: 0 done; 1 failed; 2 refused (no output there, a stale index, another model).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.search",
        description="Top-k search, by cosine similarity, over the vectors written by jobs.embed_corpus.",
    )
    p.add_argument("output", metavar="OUTPUT", help="the embedding output (local directory or s3:// prefix)")
    q = p.add_argument_group("queries")
    q.add_argument("--query", "-q", action="append", default=[], metavar="TEXT", help="a query; repeatable")
    q.add_argument(
        "--queries", metavar="FILE", help="a file of queries, one per line (or JSON Lines with a `query` field)"
    )
    q.add_argument("-k", type=int, default=10, help="hits per query [default: 10]")
    q.add_argument("--format", choices=("table", "jsonl"), default="table", help="output format [default: table]")
    q.add_argument("--index", metavar="DIR", help="answer from this HNSW index instead of the exact scan")
    q.add_argument("--ef-search", type=int, default=128, help="HNSW search breadth with --index [default: 128]")
    b = p.add_argument_group("approximate index")
    b.add_argument(
        "--build-index", metavar="DIR", help="build an HNSW index of OUTPUT into local DIR and report its recall@10"
    )
    b.add_argument(
        "--recall-queries", type=int, default=200, help="stored vectors sampled to measure recall [default: 200]"
    )
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node [default: 32]")
    b.add_argument("--ef-construction", type=int, default=200, help="HNSW build breadth [default: 200]")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="load the model from here instead of the path recorded in the output")
    m.add_argument(
        "--allow-other-revision", action="store_true", help="accept --model at another revision than the output's"
    )
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="WARNING")
    return p


def read_queries(args: argparse.Namespace) -> list[str]:
    queries = list(args.query)
    if args.queries:
        with open(args.queries, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                queries.append(json.loads(line)["query"] if line.startswith("{") else line)
    return queries


def _short(text: object, width: int = 60) -> str:
    s = "" if text is None else " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def print_results(queries: list[str], results: list[list[dict]], fmt: str) -> None:
    if fmt == "jsonl":
        for query, hits in zip(queries, results, strict=True):
            for rank, hit in enumerate(hits, 1):
                print(json.dumps({"query": query, "rank": rank, **hit}, ensure_ascii=False, default=str))
        return
    for query, hits in zip(queries, results, strict=True):
        print(f"query: {query}")
        for rank, hit in enumerate(hits, 1):
            where = f"#{hit['passage']} [{hit['char_start']}:{hit['char_end']}]" if "passage" in hit else ""
            extra = {
                k: v for k, v in hit.items() if k not in ("score", "id", "passage", "char_start", "char_end", "text")
            }
            line = f"{rank:>3}  {hit['score']:.4f}  {hit['id']} {where}".rstrip()
            if extra:
                line += "  " + " ".join(f"{k}={v}" for k, v in extra.items())
            if "text" in hit:
                line += "  " + _short(hit["text"])
            print(line)
        print()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from embedding import search
    from embedding.model import ModelNotFoundError

    try:
        queries = read_queries(args)
        if args.k < 1:
            raise search.SearchError(f"-k must be ≥ 1; got {args.k}")
        if not queries and not args.build_index:
            raise search.SearchError("give --query TEXT, --queries FILE or --build-index DIR")
        files = search.committed_files(args.output)
        meta = search.output_metadata(files)
        if args.build_index:
            index = search.AnnIndex.build(args.output, m=args.hnsw_m, ef_construction=args.ef_construction)
            index.save(args.build_index)
            sample = search.sample_vectors(files, args.recall_queries)
            recall = search.recall_at_k(
                index.search(sample, 10, args.ef_search), search.exact_search(files, sample, 10), 10
            )
            print(
                f"index {args.build_index}: {index.info['vectors']} vectors from {len(files)} file(s) in "
                f"{index.info['build_seconds']:.1f} s; recall@10 vs exact search {recall:.4f} "
                f"over {len(sample)} sampled stored vectors (ef_search {args.ef_search})"
            )
            if not queries:
                return EXIT_OK
        encoder = search.QueryEncoder(
            meta, model=args.model, device=args.device, allow_other_revision=args.allow_other_revision
        )
        vectors = encoder(queries)
        if args.index or args.build_index:
            index = search.AnnIndex.load(args.index or args.build_index, args.output)
            hits = index.search(vectors, args.k, args.ef_search)
            files = index.files
        else:
            hits = search.exact_search(files, vectors, args.k)
        results = search.hit_rows(files, hits)
    except (search.SearchError, ModelNotFoundError, FileNotFoundError, OSError, KeyError) as e:
        print(f"search: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except Exception as e:  # one line; the traceback goes to the debug log
        logging.getLogger(__name__).debug("search failed", exc_info=True)
        print(f"search: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print_results(queries, results, args.format)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
