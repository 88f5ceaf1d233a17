//! `computed`: runs the node's KVM/QEMU virtual machines through libvirt (not built yet; see the issues).
