"""Which containerd references the e2e image loader removes before it imports a new build."""

from e2e.cluster.nodes import refs_to_drop

HEADER = "REF TYPE DIGEST SIZE PLATFORMS LABELS"
MEDIA = "application/vnd.docker.distribution.manifest.v2+json"


def row(ref: str, digest: str) -> str:
    return f"{ref} {MEDIA} sha256:{digest} 5.8 GiB linux/amd64 io.cri-containerd.image=managed"


def test_the_tag_and_the_cri_id_reference_to_its_manifest_go() -> None:
    listing = "\n".join([
        HEADER,
        row("docker.io/kdistill/trainer:0.1.0", "aaa"),
        row("sha256:1111", "aaa"),
        row("docker.io/kdistill/operator:0.1.0", "bbb"),
        row("sha256:2222", "bbb"),
    ])  # fmt: skip
    assert refs_to_drop(listing, "docker.io/kdistill/trainer:0.1.0") == [
        "docker.io/kdistill/trainer:0.1.0",
        "sha256:1111",
    ]


def test_an_id_reference_left_without_a_name_goes_even_when_the_tag_is_gone() -> None:
    # An import that failed after the tag was removed leaves only the CRI's ID reference,
    # which holds several GB of layers.
    listing = "\n".join([
        HEADER,
        row("registry.k8s.io/pause:3.10", "ccc"),
        row("sha256:3333", "ccc"),
        row("sha256:4444", "ddd"),
    ])  # fmt: skip
    assert refs_to_drop(listing, "docker.io/kdistill/trainer:0.1.0") == ["sha256:4444"]


def test_an_empty_or_unreadable_listing_drops_nothing() -> None:
    assert refs_to_drop("", "docker.io/kdistill/trainer:0.1.0") == []
    assert refs_to_drop(HEADER + "\n", "docker.io/kdistill/trainer:0.1.0") == []
