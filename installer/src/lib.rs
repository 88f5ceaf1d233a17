//! `installer`: builds the bare-metal installer ISO (not built yet).
