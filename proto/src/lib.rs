//! The `census.v1` gRPC contract, generated from `proto/census/v1/census.proto` at build time.
//!
//! Layout:
//! - [`v1`]: the generated messages, clients and servers.
//! - [`convert`]: hand-written conversions between wire types and std / `ipnet` types, and the
//!   [`convert::MacAddr`] type used across Census.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

#![forbid(unsafe_code)]

pub mod convert;
pub mod transport;

/// Generated code for the `census.v1` package.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("census.v1");
}

/// The encoded `FileDescriptorSet` of `census.v1`, served by the collector's reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("census_v1_descriptor");

/// Only in the collector's development mode (plaintext, `--dev-plaintext`): the metadata key
/// carrying the caller's certificate (DER), which TLS would otherwise present. Nothing proves
/// the caller holds its key, which is why that mode is for development only.
pub const DEV_CERTIFICATE: &str = "census-dev-certificate-bin";
