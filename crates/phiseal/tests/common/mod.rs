//! Shared by the vector tests: the spec's encodings, written from `docs/FORMAT.md` alone (not
//! from the library), so the vectors' published bytes are checked against the text.

use phiseal::EncryptionContext;

/// `docs/FORMAT.md` §4: `u8 len(T) ‖ T ‖ u8 len(F) ‖ F ‖ (0x00 | 0x01 ‖ u16be len(R) ‖ R)`.
pub(crate) fn context_encoding(ctx: &EncryptionContext) -> Vec<u8> {
    let mut out = Vec::new();
    for name in [ctx.tenant().as_str(), ctx.field()] {
        out.push(u8::try_from(name.len()).unwrap());
        out.extend_from_slice(name.as_bytes());
    }
    match ctx.record() {
        None => out.push(0x00),
        Some(record) => {
            out.push(0x01);
            out.extend_from_slice(&u16::try_from(record.len()).unwrap().to_be_bytes());
            out.extend_from_slice(record.as_bytes());
        }
    }
    out
}
