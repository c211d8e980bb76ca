//! The single node's own storage: redb in `--data-dir`, needing no other service.

pub(crate) mod store;

pub(crate) use store::EmbeddedStore;
