//! `mgmt`: the highly available management service (REST API, admin panel, floating IP; not built yet).
