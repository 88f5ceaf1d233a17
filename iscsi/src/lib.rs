//! `iscsi`: the iSCSI target serving Basalt volumes as LUNs (not built yet; see the iSCSI issue).
