"""OCI images for Erebus: references, manifests, a registry client, local layouts and
docker-archive tarballs."""
