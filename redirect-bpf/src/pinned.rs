//! Maps an earlier agent pinned whose definition differs from this build's object: a map
//! grown in a new release (the policy map of a large node), or sized by the operator.
//!
//! aya reuses a map pinned under the same name whatever its definition, so a new size
//! would never take effect and a changed key would be misread. Before the object is
//! loaded, every pinned map is compared with the object's definition; one that differs
//! is opened (its content stays reachable, and the programs still attached keep using
//! it) and unpinned, so that the loader creates and pins the new one. The loader then
//! carries the old entries over when key and value sizes match
//! ([`crate::Datapath::replaced_maps`] says what was replaced and what was kept), and the
//! next attach moves every pinned link to the new programs, which read the new maps.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aya::maps::{MapData, MapInfo};

use crate::Error;

/// What defines a map for the kernel: two maps with the same definition are
/// interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl fmt::Display for MapDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// A pinned map that this load replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplacedMap {
    pub name: String,
    /// The definition of the map that was pinned.
    pub pinned: MapDef,
    /// The definition of the map now pinned in its place.
    pub loaded: MapDef,
    /// Entries carried over from the old map (None: not carried, since the key or the
    /// value changed, or the map holds no state worth keeping: counters, ring buffers).
    pub carried: Option<usize>,
}

/// An old map held open after its pin was removed, until its entries are carried over.
pub(crate) struct Unpinned {
    pub replaced: ReplacedMap,
    pub map: MapData,
}

/// The definitions of the object's maps, with `sizes` overriding `max_entries`.
pub(crate) fn object_defs(
    object: &[u8],
    sizes: &HashMap<&str, u32>,
) -> Result<HashMap<String, MapDef>, Error> {
    let obj = aya_obj::Object::parse(object).map_err(|e| Error::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let def = MapDef {
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: sizes.get(name.as_str()).copied().unwrap_or(m.max_entries()),
                flags: m.map_flags(),
            };
            (name.clone(), def)
        })
        .collect())
}

/// The definition of the map pinned at `path`, or None when nothing is pinned there.
pub(crate) fn pinned_def(path: &Path) -> Result<Option<MapDef>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    let pin_error = |e: aya::maps::MapError| Error::Pin {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let info = MapInfo::from_pin(path).map_err(pin_error)?;
    let map_type = info.map_type().map_err(pin_error)? as u32;
    Ok(Some(MapDef {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// Whether a pinned map can stand for the object's: the same definition. A ring buffer's
/// size is rounded to pages by the loader, so only its type is compared.
pub(crate) fn compatible(pinned: &MapDef, wanted: &MapDef) -> bool {
    const RINGBUF: u32 = aya::maps::MapType::RingBuf as u32;
    if wanted.map_type == RINGBUF {
        return pinned.map_type == RINGBUF;
    }
    pinned == wanted
}

/// Opens and unpins every map under `root` whose definition differs from `defs`.
pub(crate) fn unpin_mismatched(
    root: &Path,
    defs: &HashMap<String, MapDef>,
) -> Result<Vec<Unpinned>, Error> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = defs.keys().collect();
    names.sort();
    for name in names {
        let wanted = defs[name];
        let path = root.join(name);
        let Some(pinned) = pinned_def(&path)? else {
            continue;
        };
        if compatible(&pinned, &wanted) {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|e| Error::Pin {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::remove_file(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        out.push(Unpinned {
            replaced: ReplacedMap {
                name: name.clone(),
                pinned,
                loaded: wanted,
                carried: None,
            },
            map,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn def(max_entries: u32) -> MapDef {
        MapDef {
            map_type: 11,
            key_size: 16,
            value_size: 8,
            max_entries,
            flags: 1,
        }
    }

    #[test]
    fn any_difference_but_a_ring_buffer_s_rounding_makes_a_map_incompatible() {
        assert!(compatible(&def(10), &def(10)));
        assert!(!compatible(&def(10), &def(20)));
        assert!(!compatible(
            &MapDef {
                key_size: 20,
                ..def(10)
            },
            &def(10)
        ));
        assert!(!compatible(
            &MapDef {
                flags: 0,
                ..def(10)
            },
            &def(10)
        ));
        let ring = |n| MapDef {
            map_type: aya::maps::MapType::RingBuf as u32,
            key_size: 0,
            value_size: 0,
            max_entries: n,
            flags: 0,
        };
        assert!(compatible(&ring(4096), &ring(1000)));
        assert!(!compatible(&def(4096), &ring(4096)));
    }

    #[test]
    fn the_embedded_object_defines_every_map_the_loader_takes() {
        assert!(
            crate::loader::object_embedded(),
            "no eBPF object embedded: run `cargo xtask build-ebpf` first (cargo xtask test does)"
        );
        let defs = object_defs(crate::loader::object(), &HashMap::new()).unwrap();
        for name in redirect_bpf_common::map_names::ALL {
            assert!(defs.contains_key(name), "{name}: {defs:?}");
        }
        let sized = object_defs(
            crate::loader::object(),
            &[(redirect_bpf_common::map_names::POLICY, 1000)].into(),
        )
        .unwrap();
        assert_eq!(
            sized[redirect_bpf_common::map_names::POLICY].max_entries,
            1000
        );
    }
}
