//! Identities: one per distinct label set. Pods get cluster identities (256 and up), the
//! entities reserved ones (host 1, world 2, ...), CIDR prefixes and FQDN-learned IPs local
//! ones (2^24 and up), as in Cilium. Selectors are evaluated against identities once and
//! their results cached as bitsets, so a lookup is a bit test.

use std::sync::Arc;

use imbl::{HashMap as ImHashMap, Vector};
use serde::Serialize;

use crate::cluster::ContainerPort;
use crate::labels::{Key, LabelSet, Source};
use crate::selector::{Op, Selector};

/// The numeric identity the datapath and the proxies see.
pub type NumericId = u32;

pub mod reserved {
    use super::NumericId;
    pub const HOST: NumericId = 1;
    pub const WORLD: NumericId = 2;
    pub const UNMANAGED: NumericId = 3;
    pub const HEALTH: NumericId = 4;
    pub const INIT: NumericId = 5;
    pub const REMOTE_NODE: NumericId = 6;
    pub const KUBE_APISERVER: NumericId = 7;
    pub const INGRESS: NumericId = 8;
    /// First identity allocated for pods.
    pub const FIRST_CLUSTER: NumericId = 256;
    /// First identity allocated for CIDR and FQDN prefixes (node-local scope).
    pub const FIRST_LOCAL: NumericId = 1 << 24;
}

/// Dense index of an identity in a model (not the numeric identity).
pub type Idx = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityKind {
    Pod,
    Host,
    RemoteNode,
    World,
    Cidr,
    Fqdn,
}

#[derive(Clone, Debug)]
pub struct Identity {
    pub id: NumericId,
    pub kind: IdentityKind,
    pub labels: LabelSet,
    /// Named container ports of the pods with this identity (for named ports in egress
    /// rules, resolved per destination identity as Cilium does).
    pub named_ports: Vec<ContainerPort>,
}

/// A growable bitset over identity indices. It holds the words from its first set bit's
/// on: most selectors select the identities of one namespace, which are numbered
/// together, so their sets stay a few words long in a cluster of any size.
#[derive(Clone, Debug, Default)]
pub struct Bits {
    /// Index of the first word held.
    start: u32,
    words: Vec<u64>,
}

impl Bits {
    #[inline]
    pub fn contains(&self, i: Idx) -> bool {
        let w = i >> 6;
        w >= self.start
            && self
                .words
                .get((w - self.start) as usize)
                .is_some_and(|x| (x >> (i & 63)) & 1 == 1)
    }

    pub fn set(&mut self, i: Idx, on: bool) {
        let w = i >> 6;
        if self.words.is_empty() {
            if !on {
                return;
            }
            self.start = w;
        }
        if w < self.start {
            if !on {
                return;
            }
            let grow = (self.start - w) as usize;
            self.words.splice(0..0, std::iter::repeat_n(0, grow));
            self.start = w;
        }
        let at = (w - self.start) as usize;
        if at >= self.words.len() {
            if !on {
                return;
            }
            self.words.resize(at + 1, 0);
        }
        if on {
            self.words[at] |= 1 << (i & 63);
        } else {
            self.words[at] &= !(1 << (i & 63));
        }
    }

    pub fn union_with(&mut self, other: &Bits) {
        let Some((o_start, o_words)) = other.trimmed() else {
            return;
        };
        if self.trimmed().is_none() {
            self.start = o_start;
            self.words = o_words.to_vec();
            return;
        }
        let start = self.start.min(o_start);
        let end = (self.start as usize + self.words.len()).max(o_start as usize + o_words.len());
        if start < self.start {
            let grow = (self.start - start) as usize;
            self.words.splice(0..0, std::iter::repeat_n(0, grow));
            self.start = start;
        }
        self.words.resize(end - self.start as usize, 0);
        let off = (o_start - self.start) as usize;
        for (a, b) in self.words[off..].iter_mut().zip(o_words) {
            *a |= b;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Idx> + '_ {
        let base = self.start as usize;
        self.words.iter().enumerate().flat_map(move |(w, bits)| {
            (0..64)
                .filter(move |b| (bits >> b) & 1 == 1)
                .map(move |b| ((base + w) * 64 + b) as Idx)
        })
    }

    /// Gives back the memory past the words held (after a compile).
    pub fn shrink(&mut self) {
        self.words.shrink_to_fit();
    }

    /// The words from the first non-zero one to the last (None: empty).
    fn trimmed(&self) -> Option<(u32, &[u64])> {
        let first = self.words.iter().position(|w| *w != 0)?;
        let last = self.words.iter().rposition(|w| *w != 0)?;
        Some((self.start + first as u32, &self.words[first..=last]))
    }
}

impl PartialEq for Bits {
    /// Equal sets, however they are held.
    fn eq(&self, other: &Bits) -> bool {
        self.trimmed() == other.trimmed()
    }
}

impl Eq for Bits {}

/// The identity table with a label index for fast selector evaluation. In persistent
/// collections, as the selector cache: a copy shares what an update does not change.
#[derive(Clone, Debug, Default)]
pub struct Identities {
    pub list: Vector<Identity>,
    by_labels: ImHashMap<LabelSet, Idx>,
    /// (key name, value) -> identities carrying such a label (any source).
    index: ImHashMap<(String, String), Vec<Idx>>,
    /// key name -> identities carrying that key (any source, any value).
    by_key: ImHashMap<String, Vec<Idx>>,
    /// Identities no IP holds any more (FQDN identities whose last IP was forgotten).
    /// They keep their index and number but are selected by nothing until interned again.
    retired: Bits,
    next_cluster: NumericId,
    next_local: NumericId,
}

impl Identities {
    pub fn new() -> Identities {
        Identities {
            next_cluster: reserved::FIRST_CLUSTER,
            next_local: reserved::FIRST_LOCAL,
            ..Identities::default()
        }
    }

    pub fn get(&self, i: Idx) -> &Identity {
        &self.list[i as usize]
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The identity of a label set, allocating it if new. Returns the index and whether
    /// it was created, or brought back from retirement: either way, cached selectors do
    /// not know it yet ([`SelectorCache::add_identity`]).
    pub fn intern(&mut self, labels: LabelSet, kind: IdentityKind) -> (Idx, bool) {
        if let Some(&i) = self.by_labels.get(&labels) {
            if self.retired.contains(i) {
                self.retired.set(i, false);
                return (i, true);
            }
            return (i, false);
        }
        let id = self.number_for(&labels, kind);
        let idx = self.list.len() as Idx;
        for l in labels.iter() {
            self.index
                .entry((l.key.name.clone(), l.value.clone()))
                .or_default()
                .push(idx);
            self.by_key.entry(l.key.name.clone()).or_default().push(idx);
        }
        self.by_labels.insert(labels.clone(), idx);
        self.list.push_back(Identity {
            id,
            kind,
            labels,
            named_ports: Vec::new(),
        });
        (idx, true)
    }

    /// Marks an identity as held by nothing: selectors evaluated from now on skip it.
    /// The caller removes it from the cached selectors ([`SelectorCache::remove_identity`]).
    pub fn retire(&mut self, i: Idx) {
        self.retired.set(i, true);
    }

    /// Whether an identity is in use (not retired). Consumers that walk every identity
    /// (the datapath's policy entries, stable numbering) skip the others.
    pub fn is_live(&self, i: Idx) -> bool {
        !self.retired.contains(i)
    }

    fn number_for(&mut self, labels: &LabelSet, kind: IdentityKind) -> NumericId {
        // the node marker does not make a node identity less the host / remote-node
        let significant: Vec<_> = labels
            .iter()
            .filter(|l| {
                !(l.key.source == Source::Reserved && l.key.name == crate::api::common::NODE_MARKER)
            })
            .collect();
        let only = |name: &str| {
            significant.len() == 1
                && significant[0].key.source == Source::Reserved
                && significant[0].key.name == name
        };
        let fixed = [
            ("host", reserved::HOST),
            ("world", reserved::WORLD),
            ("remote-node", reserved::REMOTE_NODE),
        ];
        if let Some((_, id)) = fixed.iter().find(|(n, _)| only(n)) {
            return *id;
        }
        match kind {
            IdentityKind::Pod | IdentityKind::Host | IdentityKind::RemoteNode => {
                self.next_cluster += 1;
                self.next_cluster - 1
            }
            _ => {
                self.next_local += 1;
                self.next_local - 1
            }
        }
    }

    /// The identities a selector selects, using the label index when the selector has an
    /// `In` or `Exists` requirement.
    pub fn select(&self, sel: &Selector) -> Bits {
        let mut bits = Bits::default();
        let retired = &self.retired;
        let mut check = |list: &[Idx]| {
            for &i in list {
                if !retired.contains(i) && sel.matches(&self.list[i as usize].labels) {
                    bits.set(i, true);
                }
            }
        };
        // Narrow through the most selective indexed requirement: the smallest posting
        // list among `In` (all values) and `Exists` requirements.
        let empty: &[Idx] = &[];
        let mut best: Option<Vec<&[Idx]>> = None;
        let mut best_len = usize::MAX;
        for r in &sel.requirements {
            let lists: Vec<&[Idx]> = match &r.op {
                Op::In(vs) => vs
                    .iter()
                    .map(|v| {
                        self.index
                            .get(&(r.key.name.clone(), v.clone()))
                            .map_or(empty, Vec::as_slice)
                    })
                    .collect(),
                Op::Exists => vec![self.by_key.get(&r.key.name).map_or(empty, Vec::as_slice)],
                _ => continue,
            };
            let len: usize = lists.iter().map(|l| l.len()).sum();
            if len < best_len {
                best_len = len;
                best = Some(lists);
            }
        }
        match best {
            Some(lists) => {
                for l in lists {
                    check(l);
                }
            }
            None => {
                for (i, id) in self.list.iter().enumerate() {
                    if !self.retired.contains(i as Idx) && sel.matches(&id.labels) {
                        bits.set(i as Idx, true);
                    }
                }
            }
        }
        bits
    }
}

/// Interned selectors and peer sets (unions of selectors) with their selected identities.
///
/// Held in persistent collections (`imbl`): a copy of the cache shares everything with
/// the original and an update copies only the few nodes it changes. A node with many
/// toFQDNs names holds a selector per (name, endpoint), hundreds of thousands, and every
/// DNS answer that teaches an address works on a copy of the published model.
#[derive(Clone, Debug, Default)]
pub struct SelectorCache {
    /// Each selector once, shared with `by_selector` (a node with toFQDNs rules holds one
    /// selector per name and endpoint: hundreds of thousands).
    selectors: Vector<Arc<Selector>>,
    /// Per selector: the identities it selects.
    members: Vector<Bits>,
    by_selector: ImHashMap<Arc<Selector>, u32>,
    /// Per peer set: its selectors.
    peer_set_keys: Vector<Vec<u32>>,
    /// Per peer set: its members when they are not one selector's (a peer set of one
    /// selector reads that selector's, shared).
    peer_set_members: Vector<Option<Bits>>,
    by_peer_set: ImHashMap<Vec<u32>, u32>,
    /// Selectors by a label every selected identity must carry: `(name, Some(value))` for
    /// an `In` requirement, `(name, None)` for `Exists`. A new identity is only checked
    /// against the selectors its labels can satisfy, plus `unindexed`.
    by_label: ImHashMap<(String, Option<String>), Vec<SelectorId>>,
    unindexed: Vector<SelectorId>,
    /// Peer sets each selector belongs to.
    peer_sets_of: Vector<Vec<PeerSetId>>,
}

/// Index of an interned peer set.
pub type PeerSetId = u32;
/// Index of an interned selector.
pub type SelectorId = u32;

impl SelectorCache {
    pub fn selector(&mut self, ids: &Identities, sel: &Selector) -> SelectorId {
        if let Some(&i) = self.by_selector.get(sel) {
            return i;
        }
        let bits = ids.select(sel);
        let i = self.selectors.len() as u32;
        let narrowing = sel.requirements.iter().find_map(|r| match &r.op {
            Op::In(vs) => Some(
                vs.iter()
                    .map(|v| (r.key.name.clone(), Some(v.clone())))
                    .collect::<Vec<_>>(),
            ),
            Op::Exists => Some(vec![(r.key.name.clone(), None)]),
            _ => None,
        });
        match narrowing {
            Some(keys) => {
                for k in keys {
                    self.by_label.entry(k).or_default().push(i);
                }
            }
            None => self.unindexed.push_back(i),
        }
        let sel = Arc::new(sel.clone());
        self.selectors.push_back(Arc::clone(&sel));
        self.members.push_back(bits);
        self.peer_sets_of.push_back(Vec::new());
        self.by_selector.insert(sel, i);
        i
    }

    /// How many selectors are cached.
    pub fn selector_count(&self) -> usize {
        self.selectors.len()
    }

    pub fn members(&self, s: SelectorId) -> &Bits {
        &self.members[s as usize]
    }

    pub fn selector_of(&self, s: SelectorId) -> &Selector {
        &self.selectors[s as usize]
    }

    /// Interns the union of selectors.
    pub fn peer_set(&mut self, ids: &Identities, sels: &[Selector]) -> PeerSetId {
        let mut key: Vec<u32> = sels.iter().map(|s| self.selector(ids, s)).collect();
        key.sort_unstable();
        key.dedup();
        if let Some(&i) = self.by_peer_set.get(&key) {
            return i;
        }
        let bits = match key.as_slice() {
            [_] => None,
            _ => {
                let mut bits = Bits::default();
                for &s in &key {
                    bits.union_with(&self.members[s as usize]);
                }
                Some(bits)
            }
        };
        let i = self.peer_set_keys.len() as u32;
        for &s in &key {
            if let Some(of) = self.peer_sets_of.get_mut(s as usize) {
                of.push(i);
            }
        }
        self.peer_set_keys.push_back(key.clone());
        self.peer_set_members.push_back(bits);
        self.by_peer_set.insert(key, i);
        i
    }

    /// Gives back the memory the member sets do not use (after a compile).
    pub fn shrink(&mut self) {
        for bits in self.members.iter_mut() {
            bits.shrink();
        }
        for bits in self.peer_set_members.iter_mut().flatten() {
            bits.shrink();
        }
    }

    #[inline]
    pub fn peer_set_contains(&self, p: PeerSetId, i: Idx) -> bool {
        self.peer_set_members(p).contains(i)
    }

    pub fn peer_set_selectors(&self, p: PeerSetId) -> &[u32] {
        &self.peer_set_keys[p as usize]
    }

    pub fn peer_set_members(&self, p: PeerSetId) -> &Bits {
        match &self.peer_set_members[p as usize] {
            Some(bits) => bits,
            None => &self.members[self.peer_set_keys[p as usize][0] as usize],
        }
    }

    /// Evaluates every cached selector and peer set against a new identity.
    pub fn add_identity(&mut self, ids: &Identities, i: Idx) {
        let labels = &ids.get(i).labels;
        for s in self.candidates(labels) {
            if self.selectors[s as usize].matches(labels) {
                self.set_member(s, i, true);
            }
        }
    }

    /// Puts identity `i` in selector `s` and the peer sets it belongs to, or takes it out.
    fn set_member(&mut self, s: SelectorId, i: Idx, on: bool) {
        if let Some(bits) = self.members.get_mut(s as usize) {
            bits.set(i, on);
        }
        for &p in &self.peer_sets_of[s as usize] {
            if let Some(Some(b)) = self.peer_set_members.get_mut(p as usize) {
                b.set(i, on);
            }
        }
    }

    /// The peer sets that hold an identity.
    pub fn peer_sets_with(&self, ids: &Identities, i: Idx) -> Vec<PeerSetId> {
        let mut out: Vec<PeerSetId> = self
            .candidates(&ids.get(i).labels)
            .into_iter()
            .filter(|&s| self.members[s as usize].contains(i))
            .flat_map(|s| self.peer_sets_of[s as usize].iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Takes an identity out of every cached selector and peer set (it is being retired).
    /// Only selectors its labels can satisfy can hold it, so only those are visited.
    pub fn remove_identity(&mut self, ids: &Identities, i: Idx) {
        for s in self.candidates(&ids.get(i).labels) {
            if self.members[s as usize].contains(i) {
                self.set_member(s, i, false);
            }
        }
    }

    /// The selectors a label set can satisfy: those indexed by one of its labels, and the
    /// unindexed ones.
    fn candidates(&self, labels: &LabelSet) -> Vec<SelectorId> {
        let mut candidates: Vec<SelectorId> = self.unindexed.iter().copied().collect();
        for l in labels.iter() {
            for k in [
                (l.key.name.clone(), Some(l.value.clone())),
                (l.key.name.clone(), None),
            ] {
                if let Some(v) = self.by_label.get(&k) {
                    candidates.extend_from_slice(v);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
    }
}

/// The `fqdn:` label key of a toFQDNs pattern as observed by one endpoint.
pub fn fqdn_key(pattern: &str, endpoint: &str) -> Key {
    Key::new(Source::Fqdn, format!("{pattern}@{endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    #[test]
    fn bits() {
        let mut b = Bits::default();
        assert!(!b.contains(1000));
        b.set(1000, true);
        b.set(3, true);
        assert!(b.contains(1000) && b.contains(3) && !b.contains(4));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3, 1000]);
        b.set(1000, false);
        assert!(!b.contains(1000));
        assert!(!b.contains(5000));
        b.set(5000, false);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn bits_hold_the_words_of_their_members_only() {
        let mut b = Bits::default();
        for i in 64_000..64_100 {
            b.set(i, true);
        }
        assert!(b.words.len() <= 3, "{}", b.words.len());
        assert!(!b.contains(0) && !b.contains(63_999) && b.contains(64_050));
        b.set(128, true);
        assert!(b.contains(128) && b.contains(64_000));
        let mut c = Bits::default();
        c.set(200_000, true);
        c.union_with(&b);
        let mut want: Vec<Idx> = vec![128];
        want.extend(64_000..64_100);
        want.push(200_000);
        assert_eq!(c.iter().collect::<Vec<_>>(), want);
        // equal sets held differently are equal
        let mut d = Bits::default();
        for i in want.iter().rev() {
            d.set(*i, true);
        }
        d.set(10, true);
        d.set(10, false);
        assert_eq!(c, d);
        c.set(128, false);
        assert_ne!(c, d);
        let empty = Bits::default();
        let mut e = Bits::default();
        e.set(7, true);
        e.set(7, false);
        assert_eq!(empty, e);
        e.union_with(&empty);
        assert_eq!(e.iter().count(), 0);
    }

    #[test]
    fn a_peer_set_of_one_selector_shares_its_members() {
        let mut ids = Identities::new();
        let (a, _) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "a")]),
            IdentityKind::Pod,
        );
        let mut cache = SelectorCache::default();
        let sel = Selector::all().with(Key::new(Source::K8s, "app"), Op::Exists);
        let one = cache.peer_set(&ids, std::slice::from_ref(&sel));
        assert!(cache.peer_set_members[one as usize].is_none());
        assert!(cache.peer_set_contains(one, a));
        let (b, _) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "b")]),
            IdentityKind::Pod,
        );
        cache.add_identity(&ids, b);
        assert!(cache.peer_set_contains(one, b), "follows its selector");
        cache.remove_identity(&ids, b);
        assert!(!cache.peer_set_contains(one, b));
    }

    /// A selector is held once: the list and the index share it.
    #[test]
    fn a_cached_selector_is_held_once() {
        let ids = Identities::new();
        let mut cache = SelectorCache::default();
        let sel = Selector::all().with(Key::new(Source::K8s, "app"), Op::Exists);
        let i = cache.selector(&ids, &sel);
        assert_eq!(cache.selector(&ids, &sel), i, "found again");
        let (key, _) = cache.by_selector.get_key_value(&sel).expect("indexed");
        assert!(Arc::ptr_eq(key, &cache.selectors[i as usize]));
        assert_eq!(Arc::strong_count(key), 2);
    }

    #[test]
    fn reserved_numbers_and_allocation() {
        let mut ids = Identities::new();
        let (h, _) = ids.intern(
            LabelSet::new(vec![Label::new(Source::Reserved, "host", "")]),
            IdentityKind::Host,
        );
        assert_eq!(ids.get(h).id, reserved::HOST);
        let (p, new) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "a")]),
            IdentityKind::Pod,
        );
        assert!(new);
        assert_eq!(ids.get(p).id, reserved::FIRST_CLUSTER);
        let (p2, new) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "a")]),
            IdentityKind::Pod,
        );
        assert!(!new);
        assert_eq!(p, p2);
        let (c, _) = ids.intern(
            LabelSet::new(vec![Label::new(Source::Cidr, "10.0.0.0/8", "")]),
            IdentityKind::Cidr,
        );
        assert_eq!(ids.get(c).id, reserved::FIRST_LOCAL);
    }

    #[test]
    fn selector_cache_follows_new_identities() {
        let mut ids = Identities::new();
        let mut cache = SelectorCache::default();
        let sel = Selector::all().with(Key::new(Source::Any, "app"), Op::In(vec!["a".into()]));
        let ps = cache.peer_set(&ids, std::slice::from_ref(&sel));
        let (i, _) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "a")]),
            IdentityKind::Pod,
        );
        assert!(!cache.peer_set_contains(ps, i));
        cache.add_identity(&ids, i);
        assert!(cache.peer_set_contains(ps, i));
        let (j, _) = ids.intern(
            LabelSet::new(vec![Label::k8s("app", "b")]),
            IdentityKind::Pod,
        );
        cache.add_identity(&ids, j);
        assert!(!cache.peer_set_contains(ps, j));
    }
}
