//! Speculative path resolution (pure: no I/O). Resolving `/a/b/c` one component at a time
//! costs one round trip per component, each to the shard of the directory it is in. With a
//! cache of directory entries seen before, a client can guess every component's parent at
//! once, send all the lookups in parallel (each to its own shard), and then validate the
//! answers in order: an answer counts only if the parent it was asked of is the inode the
//! previous, validated answer returned. The first wrong guess ends the round; resolution goes
//! on from the last validated inode (the cache now corrected). A warm path costs one round
//! trip, a cold one its depth, a stale cache never a wrong answer.
//!
//! Unlike InfiniFS, directory inode numbers here are not derived from (parent, name) (each
//! shard hands out its own numbers), so the guesses come from the cache, not from a hash.

use cfs_meta::InodeId;
use std::collections::{HashMap, VecDeque};

/// Directory entries a client has resolved: (parent, name) -> inode. Bounded; the oldest
/// entry goes first.
#[derive(Debug)]
pub struct EntryCache {
    map: HashMap<(InodeId, Vec<u8>), InodeId>,
    order: VecDeque<(InodeId, Vec<u8>)>,
    capacity: usize,
}

impl EntryCache {
    /// An empty cache of at most `capacity` entries.
    pub fn new(capacity: usize) -> EntryCache {
        assert!(capacity > 0, "a cache holds at least one entry");
        EntryCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// The cached inode of `name` in `parent`.
    pub fn get(&self, parent: InodeId, name: &[u8]) -> Option<InodeId> {
        self.map.get(&(parent, name.to_vec())).copied()
    }

    /// Records (or corrects) an entry.
    pub fn insert(&mut self, parent: InodeId, name: &[u8], ino: InodeId) {
        let key = (parent, name.to_vec());
        if self.map.insert(key.clone(), ino).is_some() {
            // Corrected or confirmed: it is the newest now.
            self.order.retain(|k| k != &key);
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    /// Forgets an entry (its lookup failed).
    pub fn remove(&mut self, parent: InodeId, name: &[u8]) {
        let key = (parent, name.to_vec());
        if self.map.remove(&key).is_some() {
            self.order.retain(|k| k != &key);
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Why a path cannot be resolved before any lookup.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Resolution starts at the root.
    #[error("the path must be absolute")]
    Relative,
    /// `..` is not resolved here (it would need the parent of a directory).
    #[error("'..' is not supported in paths")]
    DotDot,
}

/// The components of an absolute path (`.` and empty components dropped).
pub fn components(path: &[u8]) -> Result<Vec<Vec<u8>>, PathError> {
    if path.first() != Some(&b'/') {
        return Err(PathError::Relative);
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

/// One lookup of a round: `name` in `parent` (a guess unless it is the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The directory asked.
    pub parent: InodeId,
    /// The entry's name.
    pub name: Vec<u8>,
}

/// The lookups to send at once for `comps[from..]`, starting in directory `at` (validated):
/// the first one for sure, each next one in the directory the cache says the previous names.
/// Stops at the first component the cache cannot guess the parent of.
pub fn speculate(comps: &[Vec<u8>], from: usize, at: InodeId, cache: &EntryCache) -> Vec<Lookup> {
    let mut out = Vec::new();
    let mut parent = Some(at);
    for name in &comps[from..] {
        let Some(p) = parent else { break };
        out.push(Lookup {
            parent: p,
            name: name.clone(),
        });
        parent = cache.get(p, name);
    }
    out
}

/// What a round's answers settle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled<E> {
    /// This many more components resolved; the last of them is this inode (resolution goes
    /// on from it, or is done).
    Resolved(usize, InodeId),
    /// A validated lookup failed: the path does not resolve (e.g. ENOENT), after this many
    /// more components.
    Failed(usize, E),
}

/// Validates a round: answer `i` counts if lookup `i` was asked of the inode answer `i - 1`
/// returned (lookup 0 always counts). Updates the cache with every counted answer (and
/// forgets a counted entry that failed). `at` is the validated directory the round began in.
pub fn settle<E: Clone>(
    plan: &[Lookup],
    answers: &[Result<InodeId, E>],
    at: InodeId,
    cache: &mut EntryCache,
) -> Settled<E> {
    assert_eq!(plan.len(), answers.len(), "one answer per lookup");
    assert!(!plan.is_empty(), "a round has at least one lookup");
    let mut cur = at;
    let mut done = 0;
    for (l, a) in plan.iter().zip(answers) {
        if l.parent != cur {
            break; // a wrong guess: this and the rest are discarded
        }
        match a {
            Ok(ino) => {
                cache.insert(l.parent, &l.name, *ino);
                cur = *ino;
                done += 1;
            }
            Err(e) => {
                cache.remove(l.parent, &l.name);
                return Settled::Failed(done, e.clone());
            }
        }
    }
    Settled::Resolved(done, cur)
}

/// Resolves `path` with `lookup_all` answering a round of lookups (the caller sends them in
/// parallel). Returns the inode and how many rounds it took.
pub fn resolve<E: Clone>(
    path: &[u8],
    cache: &mut EntryCache,
    mut lookup_all: impl FnMut(&[Lookup]) -> Vec<Result<InodeId, E>>,
) -> Result<Result<(InodeId, u32), E>, PathError> {
    let comps = components(path)?;
    let (mut at, mut from, mut rounds) = (InodeId::ROOT, 0, 0);
    while from < comps.len() {
        let plan = speculate(&comps, from, at, cache);
        let answers = lookup_all(&plan);
        rounds += 1;
        match settle(&plan, &answers, at, cache) {
            Settled::Resolved(n, ino) => {
                // The first lookup is never a guess, so every round settles at least one.
                assert!(n > 0, "a round resolved nothing");
                from += n;
                at = ino;
            }
            Settled::Failed(_, e) => return Ok(Err(e)),
        }
    }
    Ok(Ok((at, rounds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tree: (parent, name) -> inode, changed between resolutions.
    type Tree = HashMap<(InodeId, Vec<u8>), InodeId>;

    fn answer(tree: &Tree, plan: &[Lookup]) -> Vec<Result<InodeId, i32>> {
        plan.iter()
            .map(|l| tree.get(&(l.parent, l.name.clone())).copied().ok_or(2))
            .collect()
    }

    fn slow(tree: &Tree, path: &[u8]) -> Result<InodeId, i32> {
        let mut at = InodeId::ROOT;
        for c in components(path).unwrap() {
            at = *tree.get(&(at, c)).ok_or(2)?;
        }
        Ok(at)
    }

    #[test]
    fn paths_split_into_components() {
        assert_eq!(
            components(b"/a//b/./c/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(components(b"/").unwrap().is_empty());
        assert_eq!(components(b"a/b"), Err(PathError::Relative));
        assert_eq!(components(b"/a/../b"), Err(PathError::DotDot));
    }

    #[test]
    fn warm_paths_take_one_round_and_stale_guesses_are_caught() {
        let mut tree = Tree::new();
        let ino = |n: u64| InodeId(n);
        // /a/b/c/d
        tree.insert((InodeId::ROOT, b"a".to_vec()), ino(10));
        tree.insert((ino(10), b"b".to_vec()), ino(11));
        tree.insert((ino(11), b"c".to_vec()), ino(12));
        tree.insert((ino(12), b"d".to_vec()), ino(13));
        let mut cache = EntryCache::new(100);
        let cold = resolve(b"/a/b/c/d", &mut cache, |p| answer(&tree, p)).unwrap();
        assert_eq!(cold, Ok((ino(13), 4)), "cold: one round per component");
        let warm = resolve(b"/a/b/c/d", &mut cache, |p| answer(&tree, p)).unwrap();
        assert_eq!(warm, Ok((ino(13), 1)), "warm: all lookups in one round");
        // /a/b replaced by another directory: the cached guess for b is stale.
        tree.insert((ino(10), b"b".to_vec()), ino(21));
        tree.insert((ino(21), b"c".to_vec()), ino(22));
        tree.insert((ino(22), b"d".to_vec()), ino(23));
        let after = resolve(b"/a/b/c/d", &mut cache, |p| answer(&tree, p)).unwrap();
        assert_eq!(
            after,
            Ok((ino(23), 3)),
            "the old b's answers are discarded, never used"
        );
        // A missing entry is an error of the path, not of the guessing.
        assert_eq!(
            resolve(b"/a/x/c", &mut cache, |p| answer(&tree, p)).unwrap(),
            Err(2)
        );
        assert_eq!(
            resolve(b"/", &mut cache, |p| answer(&tree, p)).unwrap(),
            Ok((InodeId::ROOT, 0))
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = EntryCache::new(2);
        c.insert(InodeId(1), b"a", InodeId(2));
        c.insert(InodeId(1), b"b", InodeId(3));
        c.insert(InodeId(1), b"c", InodeId(4));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(InodeId(1), b"a"), None);
        c.remove(InodeId(1), b"b");
        assert_eq!(c.len(), 1);
    }

    proptest! {
        /// Whatever the cache believes (random, stale, wrong), speculative resolution gives
        /// the answer of resolving one component at a time, in at most depth rounds.
        #[test]
        fn speculation_never_changes_the_answer(
            edges in proptest::collection::vec((1u64..12, 0u8..3, 1u64..12), 0..40),
            lies in proptest::collection::vec((1u64..12, 0u8..3, 1u64..12), 0..20),
            path in proptest::collection::vec(0u8..3, 0..6),
        ) {
            let name = |n: u8| vec![b'a' + n];
            let mut tree = Tree::new();
            for (p, n, c) in &edges {
                tree.insert((InodeId(*p), name(*n)), InodeId(*c));
            }
            let mut cache = EntryCache::new(8);
            for (p, n, c) in &lies {
                cache.insert(InodeId(*p), &name(*n), InodeId(*c));
            }
            let mut p = b"/".to_vec();
            for n in &path {
                p.extend_from_slice(&name(*n));
                p.push(b'/');
            }
            let fast = resolve(&p, &mut cache, |l| answer(&tree, l)).unwrap();
            prop_assert_eq!(fast.map(|(i, _)| i), slow(&tree, &p));
            if let Ok((_, rounds)) = fast {
                prop_assert!(rounds as usize <= path.len());
            }
            // Resolving again (cache now corrected along the path) takes one round.
            if let Ok((_, rounds)) = resolve(&p, &mut cache, |l| answer(&tree, l)).unwrap() {
                prop_assert!(rounds <= 1);
            }
        }
    }
}
