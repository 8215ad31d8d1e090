//! A state file kept as a snapshot and a journal of the rounds of changes since. The
//! publisher saves its learned names and its identity table before it confirms a round,
//! and at 2,000 DNS answers a second rewriting the whole file each round was a fifth of
//! its time; appending the round's changes costs what the round changed. When the
//! journal outgrows the snapshot, the snapshot is written again (temporary file, then
//! rename) and the journal emptied, so the bytes written stay within twice the journal's.
//!
//! Each journal line is one round (JSON). A round's records set their keys' values
//! outright, so replaying a line twice (a crash between a snapshot's rename and the
//! journal's truncation) gives the same state. A last line cut short by a crash was never
//! confirmed: the replay stops there.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The journal never triggers a snapshot below this size.
const MIN_JOURNAL_BYTES: u64 = 256 * 1024;

/// A snapshot file and its journal (`<name>` and `<name>.journal`).
#[derive(Debug)]
pub struct Journaled {
    snapshot: PathBuf,
    journal: PathBuf,
    snapshot_bytes: u64,
    journal_bytes: u64,
    /// The journal open for appending (opened on the first append).
    open: Option<File>,
    /// The journal ends in a line cut short: the next save writes the snapshot, so that
    /// no round is appended after a line the replay stops at.
    torn: bool,
}

impl Journaled {
    /// The files `<dir>/<name>` and `<dir>/<name>.journal`.
    pub fn new(dir: &Path, name: &str) -> Journaled {
        Journaled {
            snapshot: dir.join(name),
            journal: dir.join(format!("{name}.journal")),
            snapshot_bytes: 0,
            journal_bytes: 0,
            open: None,
            torn: false,
        }
    }

    /// The snapshot's path.
    pub fn path(&self) -> &Path {
        &self.snapshot
    }

    /// Reads the snapshot (None: absent or unreadable) and the journal's rounds in order,
    /// up to the first line that does not parse.
    pub fn load<T: DeserializeOwned, R: DeserializeOwned>(&mut self) -> (Option<T>, Vec<R>) {
        let snapshot = std::fs::read(&self.snapshot).ok().and_then(|b| {
            self.snapshot_bytes = b.len() as u64;
            match serde_json::from_slice(&b) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(file = %self.snapshot.display(), error = %e, "unreadable state file ignored");
                    None
                }
            }
        });
        let mut rounds = Vec::new();
        if let Ok(f) = File::open(&self.journal) {
            for line in BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(r) => rounds.push(r),
                    Err(e) => {
                        tracing::warn!(file = %self.journal.display(), error = %e, rounds = rounds.len(), "journal replayed up to a line cut short");
                        self.torn = true;
                        break;
                    }
                }
                self.journal_bytes += line.len() as u64 + 1;
            }
        }
        (snapshot, rounds)
    }

    /// Appends one round; when the journal has outgrown the snapshot, writes the snapshot
    /// `whole()` gives instead and empties the journal.
    pub fn append<R: Serialize, T: Serialize>(
        &mut self,
        round: &R,
        whole: impl FnOnce() -> T,
    ) -> io::Result<()> {
        let mut line = serde_json::to_vec(round).map_err(io::Error::other)?;
        line.push(b'\n');
        let outgrown =
            self.journal_bytes + line.len() as u64 > self.snapshot_bytes.max(MIN_JOURNAL_BYTES);
        if outgrown || self.torn {
            return self.write_snapshot(&whole());
        }
        if self.open.is_none() {
            if let Some(dir) = self.journal.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.journal)?;
            self.journal_bytes = f.metadata()?.len();
            self.open = Some(f);
        }
        if let Some(f) = &mut self.open {
            f.write_all(&line)?;
        }
        self.journal_bytes += line.len() as u64;
        Ok(())
    }

    /// Writes `whole` as the snapshot (temporary file, then rename) and empties the
    /// journal.
    pub fn write_snapshot<T: Serialize>(&mut self, whole: &T) -> io::Result<()> {
        if let Some(dir) = self.snapshot.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let body = serde_json::to_vec(whole).map_err(io::Error::other)?;
        let tmp = self.snapshot.with_extension("tmp");
        std::fs::write(&tmp, &body)?;
        std::fs::rename(&tmp, &self.snapshot)?;
        self.snapshot_bytes = body.len() as u64;
        self.open = None;
        match std::fs::remove_file(&self.journal) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.journal_bytes = 0;
        self.torn = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::collections::BTreeMap;

    type State = BTreeMap<u32, String>;

    fn replay(dir: &Path) -> State {
        let mut j = Journaled::new(dir, "s.json");
        let (snap, rounds): (Option<State>, Vec<Vec<(u32, String)>>) = j.load();
        let mut s = snap.unwrap_or_default();
        for r in rounds {
            s.extend(r);
        }
        s
    }

    #[test]
    fn a_reload_sees_the_snapshot_and_every_round_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::new();
        let mut j = Journaled::new(dir.path(), "s.json");
        for i in 0..20_000u32 {
            let round = vec![(i % 700, format!("value {i}"))];
            state.extend(round.clone());
            j.append(&round, || state.clone()).unwrap();
            if i % 997 == 0 {
                assert_eq!(replay(dir.path()), state, "after round {i}");
            }
        }
        assert_eq!(replay(dir.path()), state);
        // the snapshot was written again along the way, and the journal kept short
        assert!(dir.path().join("s.json").exists());
        let journal = std::fs::metadata(dir.path().join("s.json.journal")).map_or(0, |m| m.len());
        assert!(journal <= MIN_JOURNAL_BYTES, "journal of {journal} bytes");
    }

    #[test]
    fn a_line_cut_short_ends_the_replay_and_a_repeated_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journaled::new(dir.path(), "s.json");
        let mut state = State::new();
        state.insert(1, "one".into());
        j.write_snapshot(&state).unwrap();
        j.append(&vec![(2, "two")], || state.clone()).unwrap();
        j.append(&vec![(1, "uno")], || state.clone()).unwrap();
        let path = dir.path().join("s.json.journal");
        let whole = std::fs::read_to_string(&path).unwrap();
        // the same rounds again (a crash before the journal was emptied), then a torn one
        std::fs::write(&path, format!("{whole}{whole}[[3,\"thr")).unwrap();
        let mut want: State = [(1, "uno".to_string()), (2, "two".to_string())].into();
        assert_eq!(replay(dir.path()), want);
        // a round saved after the torn line is read back too
        let mut j = Journaled::new(dir.path(), "s.json");
        let _: (Option<State>, Vec<Vec<(u32, String)>>) = j.load();
        want.insert(4, "four".into());
        j.append(&vec![(4, "four")], || want.clone()).unwrap();
        assert_eq!(replay(dir.path()), want);
    }
}
