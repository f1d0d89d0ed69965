"""Reading shards' tars: every member in one piece, from files and streams."""

from __future__ import annotations

from tests.helpers import shard_samples


def test_tar_members_read_a_stream_as_a_file(digit_shards):
    """Files seek, and each member is read in one piece; a pipe cannot, and is read as a stream."""
    path = min((digit_shards / "train").glob("*.tar"))
    from_file = shard_samples(str(path))
    assert len(from_file) == 170
    assert shard_samples(f"pipe:cat {path}") == from_file
