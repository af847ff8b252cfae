//! The BasicDerivation as BuildDerivation sends it (docs/serve-protocol.md §5.1).

use std::collections::BTreeMap;

use bytes::BufMut;

use super::fields::store_path_set;
use super::{ReadResult, ServeError};
use crate::derivation::{validate_output_name, BasicDerivation, DerivationOutput};
use crate::wire::{self, BufMutExt, Reader};

/// Reads a BasicDerivation: outputs, inputSrcs, platform, builder, args, env.
pub fn read_basic_derivation(
    r: &mut Reader<'_>,
    limits: &wire::Limits,
) -> ReadResult<BasicDerivation> {
    let short = limits.max_short_string_len;
    let n = r.count("outputs", limits.max_list_len)?;
    let mut outputs = BTreeMap::new();
    for _ in 0..n {
        let name_offset = r.position();
        let name = r.bytes("output name", short)?;
        let name = validate_output_name(name).map_err(|source| ServeError::DerivationOutput {
            output: String::from_utf8_lossy(name).into_owned(),
            offset: name_offset,
            source,
        })?;
        let offset = r.position();
        let path = r.bytes("output path", short)?;
        let algo = r.bytes("output hashAlgo", short)?;
        let hash = r.bytes("output hash", short)?;
        let out = DerivationOutput::from_fields(path, algo, hash).map_err(|source| {
            ServeError::DerivationOutput {
                output: name.clone(),
                offset,
                source,
            }
        })?;
        outputs.insert(name, out);
    }
    let input_srcs = store_path_set(r, "inputSrcs", limits)?;
    let platform = r.bytes("platform", short)?.to_vec();
    let builder = r.bytes("builder", limits.max_string_len)?.to_vec();
    let args = r.bytes_list("args", limits, limits.max_string_len)?;
    let n = r.count("env", limits.max_list_len)?;
    let mut env = BTreeMap::new();
    for _ in 0..n {
        let k = r.bytes("env key", limits.max_string_len)?.to_vec();
        let v = r.bytes("env value", limits.max_string_len)?.to_vec();
        env.insert(k, v);
    }
    Ok(BasicDerivation {
        outputs,
        input_srcs,
        platform,
        builder,
        args,
        env,
    })
}

/// Writes a BasicDerivation in its wire form.
pub fn encode_basic_derivation(drv: &BasicDerivation, buf: &mut impl BufMut) {
    buf.put_wire_u64(drv.outputs.len() as u64);
    for (name, out) in &drv.outputs {
        let (path, algo, hash) = out.to_fields();
        buf.put_wire_bytes(name.as_bytes());
        buf.put_wire_bytes(path.as_bytes());
        buf.put_wire_bytes(algo.as_bytes());
        buf.put_wire_bytes(hash.as_bytes());
    }
    super::fields::put_store_path_set(buf, &drv.input_srcs);
    buf.put_wire_bytes(&drv.platform);
    buf.put_wire_bytes(&drv.builder);
    buf.put_wire_strings(&drv.args);
    buf.put_wire_u64(drv.env.len() as u64);
    for (k, v) in &drv.env {
        buf.put_wire_bytes(k);
        buf.put_wire_bytes(v);
    }
}
