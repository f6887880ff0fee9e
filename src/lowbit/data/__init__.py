"""Data pipeline: corpus -> tokenizer -> cached token memmap -> batches.

    ds = prepare_dataset()                       # Shakespeare, BPE 2048, 5% tail validation
    b = Batcher(ds.train, batch_size=16, seq_len=128, seed=0)
    x, y = b.next()                              # int64 [16, 128]
"""

from lowbit._lazy import lazy_exports

# public name -> its module, imported on first use: the CLI reads lowbit.data.corpus's names without torch
_LAZY = {"Batcher": "batcher", "eval_batches": "batcher", "cache_root": "lowbit._io", "corpus_hash": "corpus",
         "load_corpus": "corpus", "load_shakespeare": "corpus", "strip_gutenberg": "corpus", "Dataset": "dataset",
         "prepare_dataset": "dataset", "split_chunks": "dataset", "token_dtype": "dataset", "EOT": "tokenizer",
         "Tokenizer": "tokenizer", "get_tokenizer": "tokenizer", "train_bpe": "tokenizer"}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
