//! A module's memory layout, parsed once for every reader: the types of its memories
//! (imported and defined) and its data segments, where each goes and what it holds.
//!
//! Two places need it, for different ends:
//!
//! - [`crate::cow_memory`] builds a module's initial memory image from memory 0's type and
//!   the active segments with constant offsets, and reads the declared minimum;
//! - [`crate::snapshot`] counts memories and segments to export every memory and rewrite the
//!   data section around the captured state.
//!
//! What only one of them needs stays with it: whether the image can express the layout
//! (one defined 32-bit memory, non-negative constant offsets, ...) is the image's judgement,
//! and the snapshot reads functions, globals and exports besides. The snapshot walks the
//! module once for all of it, handing each payload to [`MemoryLayout::visit`] as well.

use wasmparser::{BinaryReaderError, DataKind, MemoryType, Operator, Parser, Payload, TypeRef};

/// The memories and data segments of a module, in index order.
#[derive(Debug, Default)]
pub(crate) struct MemoryLayout<'a> {
    /// Imported memories: the first indices of the memory index space.
    pub(crate) imported: Vec<MemoryType>,
    /// Memories the module defines, after the imported ones.
    pub(crate) defined: Vec<MemoryType>,
    /// Every data segment, active and passive, in module order (their data indices).
    pub(crate) segments: Vec<DataSegment<'a>>,
}

/// One data segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataSegment<'a> {
    pub(crate) kind: SegmentKind,
    pub(crate) data: &'a [u8],
}

/// Where a data segment goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentKind {
    /// Copied only by `memory.init`.
    Passive,
    /// Copied into `memory` at instantiation.
    Active { memory: u32, offset: Offset },
}

/// An active segment's offset expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offset {
    /// Exactly `i32.const value`.
    I32Const(i32),
    /// Anything else (`global.get`, `i64.const`, extended constant expressions): known only
    /// at instantiation, or not a 32-bit offset.
    Other,
}

impl<'a> MemoryLayout<'a> {
    /// Parses the memory layout of `wasm`; `Err` when the module does not parse.
    pub(crate) fn parse(wasm: &'a [u8]) -> Result<MemoryLayout<'a>, BinaryReaderError> {
        let mut layout = MemoryLayout::default();
        for payload in Parser::new(0).parse_all(wasm) {
            layout.visit(&payload?)?;
        }
        Ok(layout)
    }

    /// Takes what the layout needs from one payload of the module (imports, memories, data)
    /// and ignores the others, so that a caller reading more of the module parses it once.
    pub(crate) fn visit(&mut self, payload: &Payload<'a>) -> Result<(), BinaryReaderError> {
        match payload {
            Payload::ImportSection(reader) => {
                for import in reader.clone().into_imports() {
                    if let TypeRef::Memory(ty) = import?.ty {
                        self.imported.push(ty);
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for ty in reader.clone() {
                    self.defined.push(ty?);
                }
            }
            Payload::DataSection(reader) => {
                for data in reader.clone() {
                    let data = data?;
                    let kind = match data.kind {
                        DataKind::Passive => SegmentKind::Passive,
                        DataKind::Active {
                            memory_index,
                            offset_expr,
                        } => {
                            let mut operators = offset_expr.get_operators_reader();
                            let offset = match (operators.read()?, operators.read()?) {
                                (Operator::I32Const { value }, Operator::End) => Offset::I32Const(value),
                                _ => Offset::Other,
                            };
                            SegmentKind::Active {
                                memory: memory_index,
                                offset,
                            }
                        }
                    };
                    self.segments.push(DataSegment {
                        kind,
                        data: data.data,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The type of memory `index` (imported memories first), if the module has it.
    pub(crate) fn memory(&self, index: usize) -> Option<&MemoryType> {
        match index.checked_sub(self.imported.len()) {
            None => self.imported.get(index),
            Some(defined) => self.defined.get(defined),
        }
    }

    /// How many data segments are passive.
    pub(crate) fn passive_segments(&self) -> usize {
        self.segments
            .iter()
            .filter(|segment| segment.kind == SegmentKind::Passive)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_and_segments_in_index_order() {
        let wasm = wasmer::wat2wasm(
            br#"(module
              (import "env" "shared" (memory 2 3))
              (memory 4 16)
              (memory i64 1)
              (global $g i32 (i32.const 8))
              (data (memory 1) (i32.const 16) "at sixteen")
              (data "passive")
              (data (memory 1) (global.get $g) "from a global")
              (data (memory 2) (i64.const 0) "sixty-four")
              (data (memory 1) (i32.const -1) "negative"))"#,
        )
        .unwrap();
        let layout = MemoryLayout::parse(&wasm).unwrap();
        assert_eq!(layout.imported.len(), 1);
        assert_eq!(layout.defined.len(), 2);
        assert_eq!(layout.memory(0).unwrap().initial, 2);
        assert_eq!(layout.memory(1).unwrap().maximum, Some(16));
        assert!(layout.memory(2).unwrap().memory64);
        assert!(layout.memory(3).is_none());
        let kinds: Vec<_> = layout.segments.iter().map(|segment| segment.kind).collect();
        let active = |memory, offset| SegmentKind::Active { memory, offset };
        assert_eq!(
            kinds,
            [
                active(1, Offset::I32Const(16)),
                SegmentKind::Passive,
                active(1, Offset::Other),
                active(2, Offset::Other),
                active(1, Offset::I32Const(-1)),
            ]
        );
        assert_eq!(layout.segments[0].data, b"at sixteen");
        assert_eq!(layout.passive_segments(), 1);
    }

    #[test]
    fn a_module_that_does_not_parse_is_an_error() {
        assert!(MemoryLayout::parse(b"\0asm\x01\0\0\0\x05").is_err());
        assert!(MemoryLayout::parse(b"not wasm").is_err());
    }
}
