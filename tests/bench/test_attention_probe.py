"""The fused-attention probe: both ways give the same attention and the shared buffer is written in place."""

from slmctl.bench.attention_probe import probe


def test_in_place_attention_equals_copying_and_writes_the_new_key_at_the_cache_length():
    result = probe(heads=4, kv_heads=2, head_dim=16, layers=2, cache=12, capacity=20, threads=1, calls=2)
    assert result["written_in_place"] and result["max_difference"] < 1e-5
    assert result["copying_ms"] > 0 and result["in_place_ms"] > 0
