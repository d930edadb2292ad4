//! The activation diff in the layout pyvene 0.1.8 loads with `IntervenableModel.load(dir, model)`: a
//! `config.json` and one `torch.save`-compatible zip per shifted layer holding
//! `{"source_representation": δ_l}`, applied as an `AdditionIntervention` on
//! `model.layers[l].self_attn.o_proj.input` (or `model.layers[l].mlp.down_proj.output` for a residual shift).
//! The zip and pickle bytes are written here, without torch.

use crate::io::dtype::StoredDtype;
use crate::io::names::Layer;
use crate::model::Site;

/// The intervention key pyvene ≥ 0.1.7 derives for a raw module path (`.` becomes `_`).
pub fn intervention_key(layer: usize, site: Site) -> String {
    format!("comp_{}_unit_pos_nunit_1#0", Layer(layer).component(site).replace('.', "_"))
}

pub fn file_name(layer: usize, site: Site) -> String {
    format!("intkey_{}.bin", intervention_key(layer, site))
}

/// pyvene's `IntervenableConfig` for one `AdditionIntervention` per layer at `site` (δ of `width`), keys sorted
/// as pyvene writes them.
pub fn config_json(layers: &[usize], (site, width): (Site, usize)) -> String {
    let representations: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            // Positional RepresentationConfig; index 12 (hidden_source_representation) = true makes the loader
            // register δ as a buffer, so `set_device` moves it with the model.
            serde_json::json!([
                0,
                Layer(*l).component(site),
                "pos",
                1,
                null,
                null,
                null,
                null,
                null,
                null,
                null,
                null,
                true,
                null
            ])
        })
        .collect();
    let config = serde_json::json!({
        "intervention_constant_sources": vec![true; layers.len()],
        "intervention_dimensions": vec![width; layers.len()],
        "intervention_types": vec!["<class 'pyvene.models.interventions.AdditionIntervention'>"; layers.len()],
        "mode": "parallel",
        "representations": representations,
        "sorted_keys": layers.iter().map(|&l| intervention_key(l, site)).collect::<Vec<_>>(),
    });
    serde_json::to_string_pretty(&config).expect("plain JSON") + "\n"
}

fn pickle_int(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=0xff => out.extend([0x4B, n as u8]),
        0x100..=0xffff => out.extend([0x4D, n as u8, (n >> 8) as u8]),
        _ => {
            out.push(0x4A);
            out.extend((n as i32).to_le_bytes());
        }
    }
}

fn pickle_string(out: &mut Vec<u8>, s: &str) {
    out.push(0x58); // BINUNICODE
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn pickle_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(0x63); // GLOBAL
    out.extend(format!("{module}\n{name}\n").as_bytes());
}

/// Protocol-2 pickle of `OrderedDict(source_representation=tensor[numel])` whose storage is record `0`,
/// using only globals on torch's `weights_only` allow-list.
pub fn state_dict_pickle(numel: usize, dtype: StoredDtype) -> Vec<u8> {
    let storage = match dtype {
        StoredDtype::Bf16 => "BFloat16Storage",
        StoredDtype::F16 => "HalfStorage",
        StoredDtype::F32 => "FloatStorage",
    };
    let mut p = vec![0x80, 0x02];
    let ordered_dict = |p: &mut Vec<u8>| {
        pickle_global(p, "collections", "OrderedDict");
        p.extend([0x29, 0x52]); // EMPTY_TUPLE, REDUCE
    };
    ordered_dict(&mut p);
    pickle_string(&mut p, "source_representation");
    pickle_global(&mut p, "torch._utils", "_rebuild_tensor_v2");
    p.extend([0x28, 0x28]); // MARK (rebuild args), MARK (persistent id)
    pickle_string(&mut p, "storage");
    pickle_global(&mut p, "torch", storage);
    pickle_string(&mut p, "0");
    pickle_string(&mut p, "cpu");
    pickle_int(&mut p, numel);
    p.extend([0x74, 0x51]); // TUPLE, BINPERSID
    pickle_int(&mut p, 0); // storage offset
    pickle_int(&mut p, numel);
    p.push(0x85); // TUPLE1: size
    pickle_int(&mut p, 1);
    p.push(0x85); // TUPLE1: stride
    p.push(0x89); // NEWFALSE: requires_grad
    ordered_dict(&mut p); // backward hooks
    p.extend([0x74, 0x52, 0x73, 0x2E]); // TUPLE, REDUCE, SETITEM, STOP
    p
}

/// A zip archive of stored (uncompressed) records, each record's data aligned to 64 bytes as torch does, with
/// fixed timestamps so the bytes depend on the content only.
pub fn stored_zip(records: &[(String, Vec<u8>)]) -> Vec<u8> {
    const DOS_DATE_1980_01_01: u16 = (1 << 5) | 1;
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let offset = out.len();
        let crc = crc32fast::hash(data);
        let unpadded = offset + 30 + name.len() + 4;
        let extra_len = 4 + (64 - unpadded % 64) % 64;
        let common = |v: &mut Vec<u8>| {
            v.extend(20u16.to_le_bytes()); // version needed
            v.extend(0u16.to_le_bytes()); // flags
            v.extend(0u16.to_le_bytes()); // stored
            v.extend(0u16.to_le_bytes()); // time
            v.extend(DOS_DATE_1980_01_01.to_le_bytes());
            v.extend(crc.to_le_bytes());
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((data.len() as u32).to_le_bytes());
            v.extend((name.len() as u16).to_le_bytes());
        };
        out.extend(0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend((extra_len as u16).to_le_bytes());
        out.extend(name.as_bytes());
        // One padding extra block (id "FB", as torch's writer uses) so the data starts on a 64-byte boundary.
        out.extend(0x4246u16.to_le_bytes());
        out.extend(((extra_len - 4) as u16).to_le_bytes());
        out.resize(out.len() + extra_len - 4, 0);
        out.extend(data);

        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend([0u8; 12]); // extra len, comment len, disk, internal attrs, external attrs
        central.extend((offset as u32).to_le_bytes());
        central.extend(name.as_bytes());
    }
    let central_offset = out.len();
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]); // disk numbers
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend((central_offset as u32).to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// The bytes of one `intkey_*.bin`: δ (already encoded in `dtype`) as a torch-loadable state dict.
pub fn intervention_file(delta_bytes: Vec<u8>, numel: usize, dtype: StoredDtype) -> Vec<u8> {
    stored_zip(&[
        ("archive/data.pkl".into(), state_dict_pickle(numel, dtype)),
        ("archive/byteorder".into(), b"little".to_vec()),
        ("archive/data/0".into(), delta_bytes),
        ("archive/version".into(), b"3\n".to_vec()),
    ])
}

/// Reads the records of a stored (uncompressed) zip, as written by [`stored_zip`] or by `torch.save`.
/// Returns `None` when the bytes are not such a zip.
pub fn read_stored_zip(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let eocd = (0..bytes.len().saturating_sub(21)).rev().find(|&i| u32_at(i) == Some(0x0605_4b50))?;
    let (count, mut at) = (u16_at(eocd + 10)?, u32_at(eocd + 16)?);
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        if u32_at(at)? != 0x0201_4b50 || u16_at(at + 10)? != 0 {
            return None; // not a central directory entry, or compressed
        }
        let size = u32_at(at + 20)?;
        let (name_len, extra_len, comment_len) = (u16_at(at + 28)?, u16_at(at + 30)?, u16_at(at + 32)?);
        let local = u32_at(at + 42)?;
        let name = String::from_utf8(bytes.get(at + 46..at + 46 + name_len)?.to_vec()).ok()?;
        let data_start = local + 30 + u16_at(local + 26)? + u16_at(local + 28)?;
        records.push((name, bytes.get(data_start..data_start + size)?.to_vec()));
        at += 46 + name_len + extra_len + comment_len;
    }
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 185-byte program pyvene_format.md §4 gives for a bf16[4096] vector.
    #[test]
    fn pickle_matches_the_documented_bytes() {
        let expected = "80026363 6f6c6c65 6374696f 6e730a4f 72646572 65644469 63740a29 52581500 0000736f 75726365 \
             5f726570 72657365 6e746174 696f6e63 746f7263 682e5f75 74696c73 0a5f7265 6275696c 645f7465 6e736f72 \
             5f76320a 28285807 00000073 746f7261 67656374 6f726368 0a42466c 6f617431 3653746f 72616765 0a580100 \
             00003058 03000000 6370754d 00107451 4b004d00 10854b01 85896363 6f6c6c65 6374696f 6e730a4f 72646572 \
             65644469 63740a29 52745273 2e";
        let hex: String = expected.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        assert_eq!(bytes.len(), 185);
        assert_eq!(state_dict_pickle(4096, StoredDtype::Bf16), bytes);
    }

    #[test]
    fn zip_records_are_aligned_and_laid_out_as_documented() {
        let file = intervention_file(vec![0; 8192], 4096, StoredDtype::Bf16);
        // data.pkl data@64, byteorder data@320, data/0 data@384, version data@8640, 8910 bytes in all.
        assert_eq!(&file[64..66], &[0x80, 0x02]);
        assert_eq!(&file[320..326], b"little");
        assert_eq!(&file[8640..8642], b"3\n");
        assert_eq!(file.len(), 8910);
    }
}
