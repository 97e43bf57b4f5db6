"""Container images as VM root disks: pull (skopeo), unpack (umoci), convert
to ext4 (mkfs.ext4 -d), cache by manifest digest, and give each VM its own
copy-on-write disk. See docs/images.md."""
