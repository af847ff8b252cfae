//! proptest strategies for worker-protocol values.
