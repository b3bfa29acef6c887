/*
 * memory-sync.pml: the memory-publication protocol of docs/memory-sync.md (--sync qsbr) for one daemon with a fixed
 * pool of worker threads shared by every session (device), as the code implements it: src/backend/sync-block.ts
 * (the pool block, the session blocks, publish, the grace period), queue-worker.ts (the worker loop and its
 * quiescent point), worker-pool.ts (publishMemory), and the async I/O thread of src/devices/blk/. A generation
 * carries the session's regions and its dirty log (migration: SET_LOG_BASE), published and retired the same way.
 * model/README.md says what is modelled, what is abstracted away and why, the configurations, and how to run it.
 *
 * Steps. Each Atomics operation, syscall or guest-memory access is its own step, with two exceptions, both
 * justified in README.md ("Steps"): a step carries the ghost check of the memory access it is (TOUCH), and a few
 * adjacent operations of one thread are merged where every other process's operation commutes with the one it
 * would have to be moved across (Lipton reduction). The store-then-load pairs that the protocol depends on are
 * never merged: worker idle = 0 / load epoch; control store gen / add epoch / load idle; worker enable
 * notifications / re-check avail; driver store avail.idx / load the notification flag.
 *
 * Broken variants (spin must reject each one; README.md says by which property):
 *   BROKEN_TOUCH_AFTER_IDLE   a worker re-reads the avail index after storing idle = 1
 *   BROKEN_WAKE_BEFORE_GEN    a waking worker touches memory before idle = 0 and its quiescent point
 *   BROKEN_IDLE_BEFORE_GEN    control loads the idle flags before it stores gen and bumps the epochs
 *   BROKEN_MISSING_UNPIN      a completion forgets to unpin: the pin wait never ends
 *   BROKEN_REVOKE_EARLY       control revokes before the grace period
 *   BROKEN_NO_RECHECK         a worker gives up a ring without re-checking it after re-enabling notifications
 *   BROKEN_WAIT_NO_SLICE      control's wait for a worker has no 10 ms re-check slice (only the 5 s bound)
 *   BROKEN_NO_PIN_WAIT        control revokes after the grace period without waiting for the pins
 *   BROKEN_KICK_READ_LATE     a worker reads (resets) its kick eventfd after the re-check instead of before it
 *   BROKEN_EPOCH_BEFORE_GEN   control bumps the epochs before it stores gen
 *   BROKEN_EPOCH_LATE         a worker sets lastEpoch after scanning the sessions (re-loading epoch), not before
 *   BROKEN_NO_EPOCH_BUMP      session B's control does not bump its worker's epoch (A's bumps make it scan B)
 *   BROKEN_SCAN_STOPS         a worker's scan stops at the first session whose gen changed
 *   BROKEN_WAIT_ALL           session B's grace period waits for every pool worker, not only for those of W(B)
 *   BROKEN_DRAIN_ONCE         a worker drains its port once, before loading the sessions' gens, and not again
 *                             when a gen is newer than the table it drained (the "table is not in the port" throw)
 *   BROKEN_LOG_AT_POP         a reaped completion is logged with the log of the table the worker had when it popped
 *                             the chain, not with the log of its current table
 *   BROKEN_LOG_UNMAP_EARLY    control unmaps the replaced dirty log before the grace period
 *   BROKEN_LOG_REPLY_EARLY    control replies to a log change that unmaps nothing (logging turned on) before the
 *                             grace period
 */

#define NW    2            /* pool workers: worker 0 serves sessions A and B, worker 1 serves A only */
#define NS    2            /* sessions (devices): A = 0, B = 1 */
#define NQ    3            /* rings: 0 = A's queue on worker 0, 1 = B's queue on worker 0, 2 = A's queue on worker 1 */
#define NREG  4            /* guest memory regions per session; a region keeps its slot for its whole life */
#ifndef NCHA
#define NCHA  3            /* memory-map changes of session A (0..3) */
#endif
#ifndef NCHB
#define NCHB  0            /* memory-map changes of session B (0..3) */
#endif
#ifndef NADD
#define NADD  2            /* chains the bounded driver adds (each followed by a kick when notifications are on) */
#endif
#ifndef DMASK
#define DMASK 5            /* the rings the bounded driver adds chains to (bit q: ring q); 5: A's rings */
#endif
#ifndef IOMASK
#define IOMASK 4           /* the rings whose chains may complete outside the batch (bit q: ring q); 4: ring 2 */
#endif
#ifndef LOGS
#define LOGS  0            /* bit s: session s runs the dirty-log sequence of changes instead of the region one */
#endif
#define PMAX  2            /* bound on a pin count (see HANDOFF) */

#define NCH(s)  ((s) == 0 -> NCHA : NCHB)
#define SES(q)  ((q) == 1 -> 1 : 0)          /* the session of ring q */
#define WRK(q)  ((q) == 2 -> 1 : 0)          /* the worker that runs ring q */
/* W(S), the workers that run S's queues: W(A) = {0, 1}, W(B) = {0}, as the range 0 .. WHI(S). Only those get S's
 * tables and epoch bumps, and only those are waited for (GHI: the range of the grace period). */
#define WHI(s)  ((s) == 0 -> 1 : 0)
#ifndef BROKEN_WAIT_ALL
#define GHI(s)  WHI(s)
#else
#define GHI(s)  (NW - 1)                     /* B waits for worker 1 too, which does not serve it */
#endif

/* The tables (generations) of a session: its regions as a bit mask, and its dirty log. Two sequences of changes, each
 * session on its own regions and logs.
 * The region sequence (the default): T0 = {0,1}; change 1: REM_MEM_REG 0 -> {1}; change 2: ADD_MEM_REG 2 -> {1,2};
 * change 3: SET_MEM_TABLE replacing 1 by a new region 3 (a new memfd at the same addresses) -> {2,3}. No log.
 * The log sequence (bit s of LOGS): the regions stay {0,1}; T0 has no log (logging off); change 1: logging turned on
 * (LOG_ALL negotiated and SET_LOG_BASE sent) with log 1; change 2: SET_LOG_BASE while logging is on, log 2 replaces
 * log 1; change 3: logging turned off (no log). Changes 2 and 3 each replace a log that every worker's table
 * contains until it switches; change 1 replaces none (the log appears). */
#define LSEQ(s)       ((LOGS >> (s)) & 1)
#define TBL(s, t)     (LSEQ(s) -> 3 : ((t) == 0 -> 3 : ((t) == 1 -> 2 : ((t) == 2 -> 6 : 12))))
#define ADDED(s, c)   (LSEQ(s) -> 0 : ((c) == 2 -> 4 : ((c) == 3 -> 8 : 0)))
#define REMOVED(s, c) (LSEQ(s) -> 0 : ((c) == 1 -> 1 : ((c) == 3 -> 2 : 0)))
#define REMREG(s, c)  (LSEQ(s) -> NREG : ((c) == 1 -> 0 : ((c) == 3 -> 1 : NREG)))   /* removed region; NREG: none */
/* The log of table t, as a bit mask of log mappings (0: none, logging is off; log 1 = bit 0, log 2 = bit 1); the
 * log a change maps (before posting) and the one it replaces (unmapped in step 5); LGEN: the generation that put
 * the log of table t in place (every change of the log sequence changes the log, the region sequence never does). */
#define LOG(s, t)      (LSEQ(s) -> ((t) == 1 -> 1 : ((t) == 2 -> 2 : 0)) : 0)
#define LADDED(s, c)   (LOG(s, c) & ~LOG(s, (c) - 1))
#define LREMOVED(s, c) (LOG(s, (c) - 1) & ~LOG(s, c))
#define LGEN(s, t)     (LSEQ(s) -> (t) : 0)

/* ---- the pool block (one per pool) ---- */
bit  idle[NW] = 1;         /* worker w is in (or about to enter) poll() and touches no guest memory */
bit  ep[NW];               /* epoch[w] != worker w's lastEpoch: the counter and the worker's copy of it matter only
                            * through that comparison (README.md, "Abstractions") */

/* ---- the session blocks (one per session): word i of session s is x[s * N + i] ---- */
byte gen[NS];              /* gen: generation of the newest table published */
byte seen[NS * NW];        /* seen[s * NW + w]: newest generation of s that worker w reported (w in W(s)) */
byte pins[NS * NREG];      /* pins[s * NREG + r]: requests in flight outside a batch that use region r of s */

/* ---- control, one per session ---- */
byte posted[NS];           /* newest table posted to the ports of W(s) (postMessage queues synchronously) */
byte live[NS] = 3;         /* regions of s mapped and not revoked: mapped before being posted, revoked in step 5 */
byte lmap[NS];             /* dirty logs of s mapped (SET_LOG_BASE's fd): mapped before being posted, unmapped in
                            * step 5 */
byte cwait[NS];            /* w + 1 while control of s is parked in Atomics.waitAsync on the pool word idle[w] */

/* ---- guest rings and kick eventfds ---- */
bit  work[NQ];             /* the ring holds a chain not popped yet (avail.idx != last_avail_idx); at most one */
bit  notify[NQ] = 1;       /* notifications enabled (VRING_USED_F_NO_NOTIFY clear) */
bit  kick[NQ];             /* kick eventfd count > 0 (poll only sees > 0; the read resets it) */

/* ---- the request in flight outside a batch (one at a time) ---- */
byte iow = 0;              /* w + 1: the worker that pinned it and will reap it (0: none) */
byte ireg = 0;             /* s * NREG + r + 1: the region r of session s that it pinned, where its buffers are */
bit  ioreq = 0;            /* handed to the I/O thread, not executed yet */
bit  cdone = 0;            /* executed: completion posted, completion eventfd count > 0 */
#define RSES ((ireg - 1) / NREG)             /* the request's session */
#define RREG ((ireg - 1) % NREG)             /* the request's region in it */
#ifdef BROKEN_LOG_AT_POP
byte ilt = 0;              /* the generation of the table of RSES that its worker had when it popped the chain */
#endif

/* ---- ghost state for the properties ---- */
bit  changing[NS];         /* control of s is inside a change: from step 1 to its reply */
byte replied[NS];          /* the newest change of s that control replied to (the frontend relies on it from then) */
bit  inpoll[NW] = 1;       /* worker w is blocked in (or committed to) poll(-1) */
byte dpend = 0;            /* q + 1 while the driver is between adding a chain to ring q and its kick decision */

/* A worker's touch of session s's guest memory through its table of s: every region of it is mapped, not revoked. */
#define TOUCH(s)   assert((TBL(s, lt[s]) & live[s]) == TBL(s, lt[s]))
/* A worker's write to session s's dirty log, with the log of its table t of s (none while logging is off): that log
 * is mapped, not unmapped; and no bit is lost: it is the log of the newest change control replied to, or a newer
 * one (after the reply to a change of the log, the frontend reads only the new log, or none once logging is off).
 * LOGTOUCH(s): with the log of the worker's current table, the only one the code writes. */
#define LOGW(s, t) assert((LOG(s, t) & lmap[s]) == LOG(s, t)); assert(LGEN(s, t) >= LGEN(s, replied[s]))
#define LOGTOUCH(s) LOGW(s, lt[s])
/* The I/O thread's touch of the request's region. */
#define TOUCHR     assert(((1 << RREG) & live[RSES]) != 0)

/* Atomics.notify on the pool word idle[w]: wakes every control parked on it. */
#define NOTIFY_IDLE(w) \
  if :: cwait[0] == (w) + 1 -> cwait[0] = 0 :: else -> skip fi; \
  if :: cwait[1] == (w) + 1 -> cwait[1] = 0 :: else -> skip fi

/* A lost kick: the worker of ring q is blocked in poll, the ring holds a chain, its kick eventfd is 0, and the
 * driver is not between adding that chain and its kick. Nothing will make the worker look at the ring again. */
#define LOST(q) (inpoll[WRK(q)] && work[q] && !kick[q] && dpend != (q) + 1)

/* ------------------------------------------------------------------------------------------------ worker */

#define QLO(w)     ((w) == 0 -> 0 : 2)       /* the rings worker w runs: QLO(w) .. QHI(w) */
#define QHI(w)     ((w) == 0 -> 1 : 2)
#define PI         (q - QLO(w))              /* the slot of ring q in the worker's pend[] and kicked[] */
#define ANY_PEND   (pend[0] || pend[1])
#define ANY_KICK   ((w == 0 && (kick[0] || kick[1])) || (w == 1 && kick[2]))
#define MINE_DONE  (iow == w + 1 && cdone)

/* poll() reporting the readable kick eventfds of the worker's rings: those queues become pending (dispatchReady). */
#define NOTE_KICK(q, i) if :: kick[q] -> kicked[i] = 1; pend[i] = 1 :: else -> skip fi
#define POLL_KICKS      if :: w == 0 -> NOTE_KICK(0, 0); NOTE_KICK(1, 1) :: else -> NOTE_KICK(2, 0) fi
/* The turn goes to the first (FIRSTQ) or next (NEXTQ) pending ring of w; q = NQ: none is left in this round. */
#define FIRSTQ  if :: pend[0] -> q = QLO(w) :: !pend[0] && pend[1] -> q = QHI(w) :: else -> q = NQ fi
#define NEXTQ   if :: q == QLO(w) && q != QHI(w) && pend[1] -> q = QHI(w) :: else -> q = NQ fi

/* A request of ring q that completes outside the batch, in region r of q's session: the handler hands it to the
 * I/O thread (postMessage), then pinChain pins the region (Atomics.add): the code's order, still inside the batch.
 * One request in flight at a time (a bound of the model), so a count never exceeds 1 unless an unpin is missing;
 * PMAX only keeps that broken variant's counts finite. */
#ifndef BROKEN_LOG_AT_POP
#define POPLOG
#define REAPLOG    LOGTOUCH(RSES)
#else
#define POPLOG     ; ilt = lt[SES(q)]                /* remembers the table (its log) it popped the chain with */
#define REAPLOG    LOGW(RSES, ilt)
#endif
#define HANDOFF(r) \
  atomic { (IOMASK & (1 << q)) && iow == 0 && (TBL(SES(q), lt[SES(q)]) & (1 << (r))) && \
           pins[SES(q) * NREG + (r)] < PMAX -> \
    iow = w + 1; ireg = SES(q) * NREG + (r) + 1; ioreq = 1 POPLOG } -> \
  pins[ireg - 1]++

/* Going idle, after the last touch: Atomics.store(idle[w], 1), Atomics.notify(idle[w]), then poll(-1). */
#ifndef BROKEN_TOUCH_AFTER_IDLE
#define IDLE_STORE idle[w] = 1; NOTIFY_IDLE(w); inpoll[w] = 1
#else
#define IDLE_STORE idle[w] = 1
#endif

/* The scan of session s, at a quiescent point whose epoch changed: g = Atomics.load(S.gen); if it differs from what
 * w last reported for S (seen[s][w], which only w writes): switch to the newest table of S posted. The drain before
 * the scan applied it if it was in the port then; if it was posted after that drain (and before the store of gen
 * that this load saw), drain again (REDRAIN). Then the check that the table of g is there (the code throws
 * VHOST_INTERNAL "published but its table is not in the port"), Atomics.store(S.seen[w], g), Atomics.notify(idle[w]).
 * The load of gen and the second drain are one step (README.md, "Steps"): between them S's control can at most post
 * T(g + 1) and then store gen g + 1 (the change after that waits for w's report), and the load commutes with the
 * post, the drain with the store. */
#ifdef BROKEN_SCAN_STOPS
#define SCAN_HIT ; hit = 1
#else
#define SCAN_HIT
#endif
#ifndef BROKEN_DRAIN_ONCE
#define REDRAIN(s) if :: lt[s] < g -> lt[s] = posted[s] :: else -> skip fi;
#else
#define REDRAIN(s)
#endif

inline scan(s) {
  if
  :: atomic { gen[s] != seen[(s) * NW + w] -> g = gen[s]; REDRAIN(s) assert(lt[s] >= g) };
     atomic { seen[(s) * NW + w] = g; g = 0; NOTIFY_IDLE(w) SCAN_HIT }
  :: atomic { gen[s] == seen[(s) * NW + w] }
  fi
}

active [NW] proctype worker() {
  byte w = _pid;           /* the workers are declared first: pids 0 .. NW - 1 */
  byte lt[NS];             /* per session it serves: generation of the table in use (and of its cached ring views) */
  byte g = 0;              /* the changed gen just loaded */
  byte q = 0;              /* the ring whose turn it is (NQ: none left in this round) */
  bit  pend[2];            /* per ring of w (slot q - QLO(w)): it may have work: kicked, or the batch limit was hit */
  bit  kicked[2];          /* per ring of w: poll saw its kick eventfd readable (processQueue reads it later) */
#ifdef BROKEN_SCAN_STOPS
  bit  hit = 0;            /* the scan reported a session */
#endif

  /* starts idle: its queues are running, the rings are empty, notifications are on */
  goto sleeping;

qp:
  /* The quiescent point: e = Atomics.load(epoch[w]); if e == lastEpoch, nothing to do (one load per round, whatever
   * the number of sessions). Else lastEpoch = e, before the scan: a bump during the scan makes the next quiescent
   * point scan again. */
  if
  :: atomic { !ep[w] } -> goto round
#ifndef BROKEN_EPOCH_LATE
  :: atomic { ep[w] -> ep[w] = 0 }
#else
  :: atomic { ep[w] }                            /* lastEpoch is set after the scan, below */
#endif
  fi;
  /* drainCommands: each table in the port is applied at once (setMemory: the session's table and its ring views) */
  atomic { lt[0] = posted[0]; if :: w == 0 -> lt[1] = posted[1] :: else -> skip fi };
  /* each session w serves: A, then (worker 0) B */
  scan(0);
#ifndef BROKEN_SCAN_STOPS
  if :: w == 0 -> scan(1) :: else -> skip fi;
#else
  if :: w == 0 && !hit -> scan(1) :: else -> skip fi;   /* stops at the first session that changed */
  hit = 0;
#endif
#ifdef BROKEN_EPOCH_LATE
  ep[w] = 0;                                     /* lastEpoch = Atomics.load(epoch[w]), after the scan */
#endif

round:
  if
  :: atomic { MINE_DONE ->                       /* a completion: read its eventfd, then reap: log its buffers, */
       cdone = 0; TOUCH(RSES); REAPLOG           /* pushUsed and publish (logged), through the current table of */
     } ->                                        /* its session and its log (the I/O thread never logs) */
#ifndef BROKEN_MISSING_UNPIN
     atomic { pins[ireg - 1]--; iow = 0; ireg = 0 };   /* unpin: Atomics.sub (notifies when it reaches 0) */
#else
     atomic { iow = 0; ireg = 0 };               /* forgets the unpin */
#endif
     goto qp
  :: atomic { !MINE_DONE -> FIRSTQ }             /* each pending queue has its turn, in order */
  fi;

next:
  if
  :: atomic { q < NQ -> TOUCH(SES(q)); LOGTOUCH(SES(q)); notify[q] = 0 }   /* disableNotification (logged) */
  :: atomic { q == NQ && ANY_PEND -> q = 0; POLL_KICKS } -> goto qp   /* a queue is still pending: poll(0) */
  :: atomic { q == NQ && !ANY_PEND -> q = 0; IDLE_STORE } -> goto idle_stored
     /* none: every ring's notifications are on and it was re-checked empty: going idle, after the last touch */
  fi;

pop:
  if
  :: atomic { work[q] -> TOUCH(SES(q)); work[q] = 0 } /* popChain: avail.idx, the ring, the descriptors */
  :: atomic { !work[q] -> TOUCH(SES(q)) } -> goto ring_empty
  fi;
  /* The chain completes in the batch (its touches are the pop's), or is handed to the I/O thread and pinned. Then
   * publish, read the kick eventfd if poll saw it, and BATCH_LIMIT (1 chain here) is reached: the queue stays
   * pending, and the next pending queue has its turn. A chain completed in the batch is logged (its buffers, its used
   * element, used.idx) with the log of the current table, after its writes: checked in the step after the pop. */
  if
  :: HANDOFF(0)
  :: HANDOFF(1)
  :: HANDOFF(2)
  :: HANDOFF(3)
  :: atomic { kicked[PI] -> LOGTOUCH(SES(q)); kick[q] = 0; kicked[PI] = 0; NEXTQ } -> goto next
  :: atomic { !kicked[PI] -> LOGTOUCH(SES(q)); NEXTQ } -> goto next
  fi;
  if
  :: atomic { kicked[PI] -> kick[q] = 0; kicked[PI] = 0; NEXTQ }
  :: atomic { !kicked[PI] -> NEXTQ }
  fi;
  goto next;

ring_empty:
#ifndef BROKEN_KICK_READ_LATE
  /* the kick eventfd is read after the batch, before the re-check */
  if
  :: atomic { kicked[PI] -> kick[q] = 0; kicked[PI] = 0 }
  :: atomic { !kicked[PI] -> TOUCH(SES(q)); LOGTOUCH(SES(q)); notify[q] = 1 } -> goto rearmed
  fi;
#endif
  /* enableNotification (logged): store the flag, then (SC) load avail.idx again */
  atomic { TOUCH(SES(q)); LOGTOUCH(SES(q)); notify[q] = 1 };
rearmed:
#ifndef BROKEN_NO_RECHECK
  if
  /* raced in (its kick may never come): disableNotification (logged), pop it */
  :: atomic { work[q] -> TOUCH(SES(q)); LOGTOUCH(SES(q)); notify[q] = 0 } -> goto pop
#ifndef BROKEN_KICK_READ_LATE
  :: atomic { !work[q] -> TOUCH(SES(q)); pend[PI] = 0; NEXTQ }        /* still empty: this queue is done */
#else
  :: atomic { !work[q] -> TOUCH(SES(q)); pend[PI] = 0 }
#endif
  fi;
#else
  atomic { pend[PI] = 0; NEXTQ };                /* gives up the queue without the re-check */
#endif
#ifdef BROKEN_KICK_READ_LATE
  if
  :: atomic { kicked[PI] -> kick[q] = 0; kicked[PI] = 0; NEXTQ }   /* reads the kick eventfd after the re-check */
  :: atomic { !kicked[PI] -> NEXTQ }
  fi;
#endif
  goto next;

idle_stored:
#ifdef BROKEN_TOUCH_AFTER_IDLE
  atomic { TOUCH(SES(QLO(w))); if :: work[QLO(w)] -> pend[0] = 1 :: else -> skip fi };   /* re-reads avail.idx */
  atomic { NOTIFY_IDLE(w); inpoll[w] = 1 };
#endif

sleeping:
end_poll:
  /* poll(-1) returns on a kick (the queue becomes pending) or on the completion of its request in flight */
  atomic { ANY_KICK || MINE_DONE -> inpoll[w] = 0; POLL_KICKS };
#ifdef BROKEN_WAKE_BEFORE_GEN
  atomic { TOUCH(SES(QLO(w))) };                 /* looks at a ring before the quiescent point */
#endif
  idle[w] = 0;                                   /* waking: Atomics.store(idle[w], 0), then the load of epoch[w]: */
  goto qp                                        /* Dekker with control's store of gen, add of epoch, load of idle */
}

/* ------------------------------------------------------------------------------------------------ control */

/* Step 4 for worker w: done when Atomics.load(idle[w]) == 1 or Atomics.load(S.seen[w]) >= c; else
 * Atomics.waitAsync on the pool word idle[w] (expecting 0, 10 ms): parks unless idle[w] changed, returns when
 * notified (the worker went idle, or stored a seen[w] of some session) or when the 10 ms slice runs out, and control
 * checks again. A store of seen[w] + notify between control's load of seen[w] and its park is lost: only the slice
 * ends that park. The 5 s bound is the failure and is not modelled: a wait that never ends is what the liveness
 * properties catch. */
inline grace(w) {
  do
  :: idle[w] == 1 -> break
  :: else ->
     if
     :: atomic { seen[S * NW + w] >= c } -> break
     :: atomic { seen[S * NW + w] < c }
     fi;
     atomic { if :: idle[w] == 0 -> cwait[S] = w + 1 :: else -> skip fi };   /* waitAsync: parks if idle[w] is 0 */
     if
     :: cwait[S] == 0                            /* notified, or idle[w] had changed already */
#ifndef BROKEN_WAIT_NO_SLICE
     :: atomic { cwait[S] != 0 -> cwait[S] = 0 } /* the 10 ms slice ran out */
#endif
     fi
  od
}

/* Step 5: wait until no request in flight pins the removed region of S (after the grace period no new pin can
 * reach it, so its count only goes down and the wait is one blocking load), then revoke it (anonymous memory mapped
 * over it in place), unmap the replaced log (no pin wait: only workers write logs, and the grace period covers
 * them), and reply. */
inline release_and_reply() {
#ifndef BROKEN_NO_PIN_WAIT
  if
  :: REMREG(S, c) < NREG -> (pins[S * NREG + REMREG(S, c)] == 0)
  :: else -> skip
  fi;
#endif
  atomic { live[S] = live[S] & ~REMOVED(S, c); lmap[S] = lmap[S] & ~LREMOVED(S, c); changing[S] = 0; replied[S] = c;
           c++ }
}

/* Step 3: Atomics.add(epoch[w], 1) for each w in W(S), one at a time. */
#ifndef BROKEN_NO_EPOCH_BUMP
#define BUMP_EPOCHS do :: atomic { w <= WHI(S) -> ep[w] = 1; w++ } :: else -> w = 0; break od
#else
#define BUMP_EPOCHS do :: atomic { w <= WHI(S) && S == 0 -> ep[w] = 1; w++ } :: else -> w = 0; break od
#endif

/* Control of session S (S = A, B): the daemon's event loop runs both; a change of S is one async sequence, and
 * changes of different sessions interleave at every step. */
active [NS] proctype control() {
  byte S = _pid - NW;      /* declared right after the workers: pids NW .. NW + NS - 1 */
  byte c = 1;              /* the change in progress; it publishes generation c of S */
  byte w = 0;
#ifdef BROKEN_IDLE_BEFORE_GEN
  byte early = 0;          /* workers seen idle before the store of gen */
#endif
  do
  :: c <= NCH(S) ->
     /* step 1: map the added region or log, build T(c), post it to the port of each worker of W(S) */
     atomic { changing[S] = 1; live[S] = live[S] | ADDED(S, c); lmap[S] = lmap[S] | LADDED(S, c); posted[S] = c };
#ifdef BROKEN_IDLE_BEFORE_GEN
     if :: idle[0] -> early = early | 1 :: else -> skip fi;
     if :: S == 0 && idle[1] -> early = early | 2 :: else -> skip fi;
#endif
#ifndef BROKEN_EPOCH_BEFORE_GEN
     gen[S] = c;                                 /* step 2: Atomics.store(S.gen, c) */
     BUMP_EPOCHS;                                /* step 3 */
#else
     BUMP_EPOCHS;
     gen[S] = c;
#endif
#ifdef BROKEN_REVOKE_EARLY
     if
     :: REMREG(S, c) < NREG -> (pins[S * NREG + REMREG(S, c)] == 0)
     :: else -> skip
     fi;
     live[S] = live[S] & ~REMOVED(S, c);
#endif
#ifdef BROKEN_LOG_UNMAP_EARLY
     lmap[S] = lmap[S] & ~LREMOVED(S, c);        /* unmaps the replaced log before the grace period */
#endif
#ifdef BROKEN_LOG_REPLY_EARLY
     /* nothing to unmap (logging turned on): replies at once (the grace period that follows changes nothing) */
     if :: REMREG(S, c) == NREG && LREMOVED(S, c) == 0 -> replied[S] = c :: else -> skip fi;
#endif
     /* step 4: the grace period, for each worker of W(S) */
     do
     :: w <= GHI(S) ->
#ifdef BROKEN_IDLE_BEFORE_GEN
        if :: early & (1 << w) -> skip :: else -> grace(w) fi;
#else
        grace(w);
#endif
        w++
     :: else -> w = 0; break
     od;
#ifdef BROKEN_IDLE_BEFORE_GEN
     early = 0;
#endif
     release_and_reply()                         /* step 5 */
  :: else -> break
  od
}

/* ------------------------------------------------------------------------------------------------ I/O thread */

/* Executes the handed-over request: its buffers and status byte (checked at the latest instant it uses them), then
 * posts the completion and writes the completion eventfd. */
active proctype iothread() {
end:
  do
  :: atomic { ioreq -> ioreq = 0; TOUCHR; cdone = 1 }
  od
}

/* ------------------------------------------------------------------------------------------------ driver */

/* The guest adds a chain (store avail.idx), then (virtio_mb) loads the notification flag and kicks if it is set.
 * Bounded (default): NADD chains in all, to the rings of DMASK (every run is finite). -DLOAD (= -DLOAD=1): chains for
 * ever to A's ring on worker 1 (worker 0 stays idle); -DLOAD=2: chains for ever to B's ring on the shared worker 0
 * (worker 1 stays idle). Either keeps that worker busy for ever, for liveness under load. */
#ifndef LOAD
#define MAY_ADD(q) (n < NADD && (DMASK & (1 << (q))))
#define COUNT_ADD  ; n++
#else
#define MAY_ADD(q) (((LOAD & 1) && (q) == 2) || ((LOAD & 2) && (q) == 1))
#define COUNT_ADD
#endif

inline add_and_kick(q) {
  atomic { MAY_ADD(q) && !work[q] -> work[q] = 1; dpend = q + 1 COUNT_ADD };
  if
  :: atomic { notify[q] -> t = 1 };              /* loads the flag: set */
     atomic { kick[q] = 1; dpend = 0; t = 0 }    /* the kick (eventfd write) */
  :: atomic { !notify[q] -> dpend = 0 }          /* loads the flag: clear, no kick */
  fi
}

active proctype driver() {
  byte n = 0;              /* chains added (bounded driver) */
  bit  t = 0;              /* loaded the flag set: kicks next */
end:
  do
  :: add_and_kick(0)
  :: add_and_kick(1)
  :: add_and_kick(2)
  od
}

/* ------------------------------------------------------------------------------------------------ properties */

/* Safety, in every state: no lost kick. (-DNO_MONITOR leaves it out, to show that kicks_processed alone catches a
 * lost kick too.) */
#ifndef NO_MONITOR
active proctype lostkick() {
end:
  atomic { (LOST(0) || LOST(1) || LOST(2)) -> assert(false) }
}
#endif

/* Liveness, under weak fairness (pan -a -f -N <name>). gp_ends: every change of either session ends; gp_ends_b:
 * those of session B (BROKEN_WAIT_ALL: B's changes are the ones that hang); kicks_processed: every chain is popped. */
ltl gp_ends { [] ((changing[0] -> <> !changing[0]) && (changing[1] -> <> !changing[1])) }
ltl gp_ends_b { [] (changing[1] -> <> !changing[1]) }
ltl kicks_processed { [] ((work[0] -> <> !work[0]) && (work[1] -> <> !work[1]) && (work[2] -> <> !work[2])) }
