"""Offline tiktoken encodings: built from the packaged files, checked by tiktoken's own hashes."""

import pytest

from proxy.core import encodings


def test_o200k_and_cl100k_encode_offline_with_the_published_ids():
    # Token ids as published for these encodings (the same ids tiktoken's downloaded files give).
    assert encodings.encoding("o200k_base").encode("Hello, world!") == [13225, 11, 2375, 0]
    assert encodings.encoding("cl100k_base").encode("Hello, world!") == [9906, 11, 1917, 0]
    assert encodings.encoding("o200k_base") is encodings.encoding("o200k_base")  # built once


def test_a_file_that_does_not_match_the_hash_is_refused():
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    with pytest.raises(ValueError, match="sha256"):
        encodings._packaged_ranks(url, expected_hash="0" * 64)


def test_unknown_encoding_names_the_known_ones():
    with pytest.raises(ValueError, match="o200k_base, cl100k_base"):
        encodings.encoding("p50k_base")
