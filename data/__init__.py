"""Data: embedded TFDS corpora (python_source, markov), tokenizers and the grain LM loader."""
from data.lm import bigram_conditional_entropy
from data.lm import bytes_per_token_factor
from data.lm import default_data_config
from data.lm import known_entropy_rate
from data.lm import make_lm_iterator
from data.lm import token_stream
from data.lm import unigram_entropy
from data.lm import vocab_size
