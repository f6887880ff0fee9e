"""Data pipeline: corpus -> tokenizer -> cached token memmap -> batches.

    ds = prepare_dataset()                       # Shakespeare, BPE 2048, 5% tail validation
    b = Batcher(ds.train, batch_size=16, seq_len=128, seed=0)
    x, y = b.next()                              # int64 [16, 128]
"""

from .batcher import Batcher, eval_batches
from lowbit._io import cache_root

from .corpus import corpus_hash, load_corpus, load_shakespeare, strip_gutenberg
from .dataset import Dataset, prepare_dataset, split_chunks, token_dtype
from .tokenizer import EOT, Tokenizer, get_tokenizer, train_bpe

__all__ = ["Batcher", "eval_batches", "cache_root", "corpus_hash", "load_corpus", "load_shakespeare",
           "strip_gutenberg", "Dataset", "prepare_dataset", "split_chunks", "token_dtype", "EOT",
           "Tokenizer", "get_tokenizer", "train_bpe"]
