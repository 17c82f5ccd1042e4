import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def small_llama_config(**overrides):
    """A transformers Llama config of a few hundred thousand parameters: nothing downloaded."""
    from transformers import LlamaConfig

    fields = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
    )
    return LlamaConfig(**(fields | overrides))
