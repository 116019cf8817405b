"""A short soak (`make soak` is the long one): clients streaming, abandoning streams, reading slowly,
sending bad requests and oversized bodies, all at once; no unexpected answer, no 5xx, no slot lost."""

import os

from conftest import running_server

from slmctl.serve.soak import passed, soak


def test_a_short_soak_of_eight_mixed_clients_ends_with_every_slot_free(tmp_path, tiny_model_dir):
    with running_server(tmp_path, tiny_model_dir, "model_name=tiny", "max_batch=4", "max_queue=64",
                        "max_tokens_cap=32") as server:
        report = soak(server.url, os.getpid(), clients=8, duration=6, max_tokens=16)
    kinds = report["statuses_by_kind"]
    assert report["requests"] > 40 and {"stream", "plain", "bad"} <= set(kinds), report
    assert passed(report, max_growth=0.5), report  # (the test process's memory, not the server's alone)
