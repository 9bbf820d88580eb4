//! The streaming decoder: bytes in (any chunking), records out, state carried across
//! pages and segments.
//!
//! Memory: the decoder keeps the bytes fed and not yet decoded, plus at most
//! [`MAX_HEADERS_LEN`] bytes of the record being assembled; a record spanning many pages
//! or segments is checked (CRC) as its pieces pass, never buffered whole. Feed a segment,
//! drain [`WalDecoder::next_record`] until it asks for input, feed the next.

use crate::core::pg::wal::Lsn;

use super::page::{
    HeaderRead, PageHeader, PageProblem, PageRules, WalGeometry, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
};
use super::record::{
    check_crc, check_length, decode_body, RecordHeader, MAX_HEADERS_LEN, RECORD_HEADER_LEN,
    RM_XLOG_ID, XLOG_SWITCH, XLR_RMGR_INFO_MASK,
};
use super::{DecodeError, DecodedRecord, EndReason, Invalid, Next, WalEnd};

/// Decoding may start anywhere below this LSN (4 EiB of WAL; no cluster gets near). The
/// bound keeps every position the decoder computes far from `u64` overflow.
pub const MAX_START_LSN: u64 = 1 << 62;

/// A WAL decoder fed with consecutive bytes starting at a known LSN.
///
/// ```
/// use walvault_protocol::core::pg::waldecode::{WalDecoder, Next};
/// use walvault_protocol::core::pg::wal::Lsn;
///
/// # fn segments() -> Vec<Vec<u8>> { Vec::new() }
/// let mut decoder = WalDecoder::new(Lsn(0x0100_0000)).unwrap();
/// for segment in segments() {
///     decoder.feed(&segment);
///     while let Next::Record(record) = decoder.next_record().unwrap() {
///         println!("{} {}", record.lsn, record.blocks.len());
///     }
/// }
/// decoder.finish();
/// // Now next_record() drains what is left and says how the WAL ended.
/// ```
#[derive(Clone, Debug)]
pub struct WalDecoder {
    /// Bytes fed and not yet dropped; `buf[0]` is at `buf_lsn`.
    buf: Vec<u8>,
    buf_lsn: u64,
    /// The next byte to examine.
    pos: u64,
    input_start: u64,
    input_done: bool,
    geometry: Option<WalGeometry>,
    relation_block_size: Option<u32>,
    magic: Option<u16>,
    system_id: Option<u64>,
    timeline: u32,
    /// The last record returned (for `xl_prev`); `None` until the first.
    previous: Option<u64>,
    /// The first bytes (up to `MAX_HEADERS_LEN`) of the record being assembled.
    scratch: Vec<u8>,
    state: State,
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Nothing read yet: the first page header comes next.
    Start,
    /// Skipping the tail of a record that began before the input; `pos` is a page start.
    SkipContinuation,
    /// A record (or, at a page start, a page header and then a record) comes next.
    AtRecord,
    InRecord(Partial),
    /// Decoding failed; deciding between end of WAL and corruption.
    Judging(Judgement),
    Done(Outcome),
}

/// A record being assembled.
#[derive(Clone, Copy, Debug)]
struct Partial {
    lsn: u64,
    tot_len: u32,
    got: u32,
    /// CRC-32C of the bytes after the fixed header, so far.
    data_crc: u32,
    header_checked: bool,
}

#[derive(Clone, Copy, Debug)]
struct Judgement {
    invalid: Invalid,
    /// Where valid WAL stops if this is the end.
    end: u64,
    /// The first page after everything examined: written there means WAL went on.
    evidence_page: u64,
    /// A record that would follow the damaged one on the same page.
    probe: Option<Probe>,
}

#[derive(Clone, Copy, Debug)]
struct Probe {
    damaged: u64,
    next: u64,
    page_end: u64,
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    End(WalEnd),
    Failed(DecodeError),
}

/// One step of the state machine.
enum Flow {
    Continue,
    Yield(Next),
}

fn align8(lsn: u64) -> u64 {
    (lsn + 7) & !7
}

impl WalDecoder {
    /// A decoder for input starting at `input_start`, the beginning of a segment: the
    /// segment and page sizes are learned from its long page header.
    pub fn new(input_start: Lsn) -> Result<WalDecoder, DecodeError> {
        if input_start.0 >= MAX_START_LSN {
            return Err(DecodeError::BadStart {
                lsn: input_start,
                why: "beyond any LSN a cluster reaches",
            });
        }
        Ok(WalDecoder {
            buf: Vec::new(),
            buf_lsn: input_start.0,
            pos: input_start.0,
            input_start: input_start.0,
            input_done: false,
            geometry: None,
            relation_block_size: None,
            magic: None,
            system_id: None,
            timeline: 0,
            previous: None,
            scratch: Vec::with_capacity(MAX_HEADERS_LEN),
            state: State::Start,
        })
    }

    /// A decoder for input starting at any page boundary, with the geometry known (from
    /// the cluster, or an earlier segment). Decoding begins at the first record that
    /// starts in the input; the tail of one begun earlier is skipped.
    pub fn with_geometry(
        input_start: Lsn,
        geometry: WalGeometry,
    ) -> Result<WalDecoder, DecodeError> {
        if !geometry.is_page_start(input_start.0) {
            return Err(DecodeError::BadStart {
                lsn: input_start,
                why: "not at a page boundary",
            });
        }
        let mut decoder = WalDecoder::new(input_start)?;
        decoder.geometry = Some(geometry);
        Ok(decoder)
    }

    /// Sets the relation page size (`BLCKSZ`) used to check full-page image headers. By
    /// default it is the WAL page size, as in every standard build of PostgreSQL.
    pub fn set_relation_block_size(&mut self, block_size: u32) {
        self.relation_block_size = Some(block_size);
    }

    /// Appends input: the bytes following everything fed before.
    pub fn feed(&mut self, bytes: &[u8]) {
        // Everything before `pos` has been examined for good.
        let examined = self.pos.min(self.input_end_u64()) - self.buf_lsn;
        if examined > 0 {
            self.buf.drain(..examined as usize);
            self.buf_lsn += examined;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Declares that no more input follows: what is missing is the end of the input.
    pub fn finish(&mut self) {
        self.input_done = true;
    }

    /// The LSN just after the last byte fed.
    pub fn input_end(&self) -> Lsn {
        Lsn(self.input_end_u64())
    }

    fn input_end_u64(&self) -> u64 {
        self.buf_lsn + self.buf.len() as u64
    }

    /// Segment and page size, once known.
    pub fn geometry(&self) -> Option<WalGeometry> {
        self.geometry
    }

    /// PostgreSQL major version of the WAL, once its first page has been read.
    pub fn pg_major(&self) -> Option<u32> {
        self.magic
            .and_then(crate::core::pg::wal::pg_major_for_magic)
    }

    /// The next record; [`Next::NeedInput`] when the bytes fed so far are not enough
    /// (never after [`finish`](Self::finish)); [`Next::End`] once, and from then on, when
    /// the WAL ends. An error is corruption (or unusable input) and is final too.
    pub fn next_record(&mut self) -> Result<Next, DecodeError> {
        loop {
            let flow = match self.state {
                State::Start => self.start(),
                State::SkipContinuation => self.skip_continuation(),
                State::AtRecord => self.at_record(),
                State::InRecord(partial) => self.in_record(partial),
                State::Judging(judgement) => self.judge(judgement),
                State::Done(Outcome::End(end)) => return Ok(Next::End(end)),
                State::Done(Outcome::Failed(e)) => return Err(e),
            };
            if let Flow::Yield(next) = flow {
                return Ok(next);
            }
        }
    }

    // --- input access -------------------------------------------------------------------

    /// The fed bytes from `lsn` on (empty when none).
    fn bytes_from(&self, lsn: u64) -> &[u8] {
        match lsn.checked_sub(self.buf_lsn) {
            Some(off) if off < self.buf.len() as u64 => &self.buf[off as usize..],
            _ => &[],
        }
    }

    /// Out of input: wait for more, or end with `end` if none will come.
    fn out_of_input(&mut self, end: WalEnd) -> Flow {
        if self.input_done {
            self.state = State::Done(Outcome::End(end));
            Flow::Continue
        } else {
            Flow::Yield(Next::NeedInput)
        }
    }

    fn geometry_known(&self) -> WalGeometry {
        // Every state after Start has the geometry (Start sets it or fails).
        self.geometry.unwrap_or(WalGeometry::DEFAULT)
    }

    fn rules(&self) -> PageRules {
        PageRules {
            magic: self.magic.unwrap_or(0),
            geometry: self.geometry_known(),
            system_id: self.system_id,
            timeline: self.timeline,
        }
    }

    /// Checks the header of the page at `address` against the stream and, if good,
    /// learns from it.
    fn accept_page(&mut self, h: &PageHeader, address: u64) -> Result<(), PageProblem> {
        self.rules().check(h, address)?;
        if let Some((system_id, _, _)) = h.long {
            self.system_id.get_or_insert(system_id);
        }
        self.timeline = h.timeline;
        Ok(())
    }

    /// Decoding failed: judge whether WAL goes on after the failure (corruption) or not
    /// (end of WAL). `last_examined` is the last byte looked at.
    fn fail(
        &mut self,
        invalid: Invalid,
        end: u64,
        last_examined: u64,
        probe: Option<Probe>,
    ) -> Flow {
        let evidence_page = self.geometry_known().next_page(last_examined);
        self.state = State::Judging(Judgement {
            invalid,
            end,
            evidence_page,
            probe,
        });
        Flow::Continue
    }

    fn page_failure(&mut self, page: u64, problem: PageProblem, end: u64) -> Flow {
        let invalid = Invalid::Page {
            page: Lsn(page),
            problem,
        };
        self.fail(invalid, end, page, None)
    }

    // --- states -------------------------------------------------------------------------

    fn start(&mut self) -> Flow {
        let start = self.input_start;
        let h = match PageHeader::read(self.bytes_from(start)) {
            HeaderRead::Ready(h) => h,
            HeaderRead::Short => {
                return self.out_of_input(WalEnd {
                    lsn: Lsn(start),
                    reason: EndReason::InputExhausted,
                })
            }
        };
        if self.magic.is_none() {
            if h.is_zeroed() {
                // A segment never written: the WAL ends before it.
                self.state = State::Done(Outcome::End(WalEnd {
                    lsn: Lsn(start),
                    reason: EndReason::EndOfWal(Invalid::Page {
                        page: Lsn(start),
                        problem: PageProblem::Zeroed,
                    }),
                }));
                return Flow::Continue;
            }
            if crate::core::pg::wal::pg_major_for_magic(h.magic).is_none() {
                return self.bad_first_page(PageProblem::BadMagic {
                    found: h.magic,
                    expected: 0,
                });
            }
            self.magic = Some(h.magic);
        }
        if self.geometry.is_none() {
            let geometry = match h.long_geometry() {
                Some(Ok(g)) if g.is_segment_start(start) => g,
                Some(Ok(_)) | None => return self.bad_first_page(PageProblem::NoGeometry),
                Some(Err(problem)) => return self.bad_first_page(problem),
            };
            self.geometry = Some(geometry);
        }
        if let Err(problem) = self.accept_page(&h, start) {
            return self.page_failure(start, problem, start);
        }
        self.skip_from(start, &h);
        Flow::Continue
    }

    /// The input cannot be decoded at all.
    fn bad_first_page(&mut self, problem: PageProblem) -> Flow {
        self.state = State::Done(Outcome::Failed(DecodeError::BadFirstPage {
            lsn: Lsn(self.input_start),
            problem,
        }));
        Flow::Continue
    }

    /// After the header of the page at `page`: skip continuation data of a record begun
    /// earlier (as PostgreSQL's `XLogFindNextRecord`), or start at the first record.
    fn skip_from(&mut self, page: u64, h: &PageHeader) {
        let data = page + h.len();
        let room = self.geometry_known().page_size() as u64 - h.len();
        if !h.has(XLP_FIRST_IS_CONTRECORD) {
            self.pos = data;
            self.state = State::AtRecord;
        } else if align8(h.rem_len as u64) >= room {
            self.pos = page + self.geometry_known().page_size() as u64;
            self.state = State::SkipContinuation;
        } else {
            self.pos = data + align8(h.rem_len as u64);
            self.state = State::AtRecord;
        }
    }

    fn skip_continuation(&mut self) -> Flow {
        let page = self.pos;
        let h = match PageHeader::read(self.bytes_from(page)) {
            HeaderRead::Ready(h) => h,
            HeaderRead::Short => {
                return self.out_of_input(WalEnd {
                    lsn: Lsn(page),
                    reason: EndReason::InputExhausted,
                })
            }
        };
        if let Err(problem) = self.accept_page(&h, page) {
            return self.page_failure(page, problem, page);
        }
        self.skip_from(page, &h);
        Flow::Continue
    }

    fn at_record(&mut self) -> Flow {
        let geometry = self.geometry_known();
        if geometry.is_page_start(self.pos) {
            let page = self.pos;
            let h = match PageHeader::read(self.bytes_from(page)) {
                HeaderRead::Ready(h) => h,
                HeaderRead::Short => {
                    return self.out_of_input(WalEnd {
                        lsn: Lsn(page),
                        reason: EndReason::InputExhausted,
                    })
                }
            };
            if let Err(problem) = self.accept_page(&h, page) {
                return self.page_failure(page, problem, page);
            }
            if h.has(XLP_FIRST_IS_CONTRECORD) {
                return self.page_failure(page, PageProblem::UnexpectedContrecord, page);
            }
            self.pos = page + h.len();
        }
        let lsn = self.pos;
        let available = self.bytes_from(lsn);
        let Some(len_bytes) = available.first_chunk::<4>() else {
            let reason = if available.is_empty() {
                EndReason::InputExhausted
            } else {
                EndReason::IncompleteRecord
            };
            return self.out_of_input(WalEnd {
                lsn: Lsn(lsn),
                reason,
            });
        };
        let tot_len = u32::from_le_bytes(*len_bytes);
        if let Err(problem) = check_length(tot_len) {
            let invalid = Invalid::Record {
                lsn: Lsn(lsn),
                problem,
            };
            return self.fail(invalid, lsn, lsn, None);
        }
        self.scratch.clear();
        self.state = State::InRecord(Partial {
            lsn,
            tot_len,
            got: 0,
            data_crc: 0,
            header_checked: false,
        });
        Flow::Continue
    }

    fn in_record(&mut self, mut rec: Partial) -> Flow {
        let geometry = self.geometry_known();
        while rec.got < rec.tot_len {
            if geometry.is_page_start(self.pos) {
                match self.continuation_page(&rec) {
                    Ok(true) => {}
                    Ok(false) => return Flow::Continue,
                    Err(flow) => return flow,
                }
            }
            let page_end = geometry.next_page(self.pos);
            let want = (page_end - self.pos).min((rec.tot_len - rec.got) as u64);
            let n = self.absorb(&mut rec, want);
            if n == 0 {
                self.state = State::InRecord(rec);
                return self.out_of_input(WalEnd {
                    lsn: Lsn(rec.lsn),
                    reason: EndReason::IncompleteRecord,
                });
            }
            if !rec.header_checked && rec.got as usize >= RECORD_HEADER_LEN {
                rec.header_checked = true;
                if let Err(problem) =
                    self.record_header()
                        .check(rec.lsn, self.previous, self.pg_major_known())
                {
                    let invalid = Invalid::Record {
                        lsn: Lsn(rec.lsn),
                        problem,
                    };
                    let (last, probe) = (self.pos - 1, self.probe_after(&rec));
                    return self.fail(invalid, rec.lsn, last, probe);
                }
            }
        }
        self.finish_record(rec)
    }

    /// Takes up to `want` bytes of the record from the input at `pos`: keeps the first
    /// ones (headers), runs the CRC over those after the fixed header. Returns how many.
    fn absorb(&mut self, rec: &mut Partial, want: u64) -> usize {
        let off = match self.pos.checked_sub(self.buf_lsn) {
            Some(off) if off < self.buf.len() as u64 => off as usize,
            _ => return 0,
        };
        let n = (want as usize).min(self.buf.len() - off);
        let chunk = &self.buf[off..off + n];
        if self.scratch.len() < MAX_HEADERS_LEN {
            let keep = (MAX_HEADERS_LEN - self.scratch.len()).min(n);
            self.scratch.extend_from_slice(&chunk[..keep]);
        }
        let header_part = RECORD_HEADER_LEN.saturating_sub(rec.got as usize).min(n);
        rec.data_crc = crc32c::crc32c_append(rec.data_crc, &chunk[header_part..]);
        rec.got += n as u32;
        self.pos += n as u64;
        n
    }

    fn pg_major_known(&self) -> u32 {
        self.pg_major().unwrap_or(0)
    }

    /// The fixed header of the record being assembled (its first 24 bytes are in).
    fn record_header(&self) -> RecordHeader {
        let mut fixed = [0u8; RECORD_HEADER_LEN];
        if let Some(h) = self.scratch.get(..RECORD_HEADER_LEN) {
            fixed.copy_from_slice(h);
        }
        RecordHeader::read(&fixed)
    }

    /// At a page boundary inside a record: checks the page continues it. `Ok(true)`: go
    /// on; `Ok(false)`: the state changed (the record was abandoned, see
    /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`); `Err`: the flow to return.
    fn continuation_page(&mut self, rec: &Partial) -> Result<bool, Flow> {
        let page = self.pos;
        let h = match PageHeader::read(self.bytes_from(page)) {
            HeaderRead::Ready(h) => h,
            HeaderRead::Short => {
                self.state = State::InRecord(*rec);
                return Err(self.out_of_input(WalEnd {
                    lsn: Lsn(rec.lsn),
                    reason: EndReason::IncompleteRecord,
                }));
            }
        };
        if let Err(problem) = self.accept_page(&h, page) {
            return Err(self.page_failure(page, problem, rec.lsn));
        }
        if h.has(XLP_FIRST_IS_OVERWRITE_CONTRECORD) {
            // The record was cut short by a crash and PostgreSQL wrote on from here:
            // forget it, as its reader does, and read the record that replaced it.
            self.pos = page + h.len();
            self.state = State::AtRecord;
            return Ok(false);
        }
        let left = rec.tot_len - rec.got;
        if !h.has(XLP_FIRST_IS_CONTRECORD) {
            return Err(self.page_failure(page, PageProblem::MissingContrecord, rec.lsn));
        }
        if h.rem_len == 0 || h.rem_len != left {
            let problem = PageProblem::ContrecordLength {
                found: h.rem_len,
                expected: left,
            };
            return Err(self.page_failure(page, problem, rec.lsn));
        }
        self.pos = page + h.len();
        Ok(true)
    }

    /// A damaged record that sits on one page may be followed by a good one there: where
    /// to look.
    fn probe_after(&self, rec: &Partial) -> Option<Probe> {
        let page_end = self.geometry_known().next_page(rec.lsn);
        let end = rec.lsn + rec.tot_len as u64;
        (end <= page_end).then_some(Probe {
            damaged: rec.lsn,
            next: align8(end),
            page_end,
        })
    }

    fn finish_record(&mut self, rec: Partial) -> Flow {
        let geometry = self.geometry_known();
        let last = self.pos - 1;
        let fail_record = |problem| Invalid::Record {
            lsn: Lsn(rec.lsn),
            problem,
        };
        let probe = self.probe_after(&rec);
        if let Err(problem) = check_crc(&self.scratch, rec.data_crc) {
            return self.fail(fail_record(problem), rec.lsn, last, probe);
        }
        let header = self.record_header();
        let block_size = self.relation_block_size.unwrap_or(geometry.page_size());
        let body = match decode_body(
            self.scratch.get(RECORD_HEADER_LEN..).unwrap_or_default(),
            rec.tot_len,
            self.pg_major_known(),
            block_size,
        ) {
            Ok(body) => body,
            Err(problem) => return self.fail(fail_record(problem), rec.lsn, last, probe),
        };
        let end = self.pos;
        let mut next = align8(end);
        let is_switch =
            header.rmid == RM_XLOG_ID && header.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH;
        if is_switch {
            next = geometry.round_up_to_segment(next);
        }
        self.pos = next;
        self.previous = Some(rec.lsn);
        self.state = State::AtRecord;
        Flow::Yield(Next::Record(DecodedRecord {
            lsn: Lsn(rec.lsn),
            end_lsn: Lsn(end),
            next_lsn: Lsn(next),
            prev_lsn: Lsn(header.prev),
            xid: header.xid,
            rmid: header.rmid,
            info: header.info,
            total_len: rec.tot_len,
            blocks: body.blocks,
            main_data_len: body.main_data_len,
            origin: body.origin,
            toplevel_xid: body.toplevel_xid,
        }))
    }

    // --- judging ------------------------------------------------------------------------

    fn judge(&mut self, mut j: Judgement) -> Flow {
        if let Some(probe) = j.probe {
            match self.probe(probe) {
                Some(true) => return self.corrupt(j.invalid, probe.next),
                Some(false) => j.probe = None,
                None if self.input_done => j.probe = None,
                None => {
                    self.state = State::Judging(j);
                    return Flow::Yield(Next::NeedInput);
                }
            }
        }
        match PageHeader::read(self.bytes_from(j.evidence_page)) {
            HeaderRead::Ready(h) if h.is_written_for(j.evidence_page) => {
                self.corrupt(j.invalid, j.evidence_page)
            }
            HeaderRead::Short if !self.input_done => {
                self.state = State::Judging(j);
                Flow::Yield(Next::NeedInput)
            }
            _ => {
                self.state = State::Done(Outcome::End(WalEnd {
                    lsn: Lsn(j.end),
                    reason: EndReason::EndOfWal(j.invalid),
                }));
                Flow::Continue
            }
        }
    }

    fn corrupt(&mut self, invalid: Invalid, evidence: u64) -> Flow {
        self.state = State::Done(Outcome::Failed(DecodeError::Corrupt {
            invalid,
            valid_wal_at: Lsn(evidence),
        }));
        Flow::Continue
    }

    /// Whether a good record, linked to the damaged one, follows it on the same page;
    /// `None` while its bytes have not been fed.
    fn probe(&self, p: Probe) -> Option<bool> {
        if p.next + RECORD_HEADER_LEN as u64 > p.page_end {
            return Some(false);
        }
        let bytes = self.bytes_from(p.next);
        let fixed = bytes.first_chunk::<RECORD_HEADER_LEN>()?;
        let header = RecordHeader::read(fixed);
        let len = header.tot_len as u64;
        if len < RECORD_HEADER_LEN as u64 || p.next + len > p.page_end || header.prev != p.damaged {
            return Some(false);
        }
        let record = bytes.get(..len as usize)?;
        let data_crc = crc32c::crc32c(&record[RECORD_HEADER_LEN..]);
        Some(check_crc(record, data_crc).is_ok())
    }
}
