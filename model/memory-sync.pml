/*
 * memory-sync.pml: the memory-publication protocol of docs/memory-sync.md (--sync qsbr), as the code implements it
 * (src/backend/sync-block.ts, queue-worker.ts, worker-pool.ts, and the async I/O thread of src/devices/blk/).
 * model/README.md says what is modelled, what is abstracted away and why, and how to run it.
 *
 * Steps. Each Atomics operation, syscall or guest-memory access is its own step, with two exceptions, both
 * justified in README.md ("Steps"): a step carries the ghost check of the memory access it is (TOUCH), and a few
 * adjacent operations of one thread are merged where every other process's operation commutes with the one it
 * would have to be moved across (Lipton reduction). The four store-then-load pairs that the protocol depends on
 * are never merged: worker idle=0 / load gen, control store gen / load idle, worker enable notifications / re-check
 * avail, driver store avail.idx / load the notification flag.
 *
 * Broken variants (spin must reject each one; see README.md):
 *   BROKEN_TOUCH_AFTER_IDLE   a worker re-reads the avail index after storing idle = 1
 *   BROKEN_WAKE_BEFORE_GEN    a waking worker touches memory before storing idle = 0 and loading gen
 *   BROKEN_IDLE_BEFORE_GEN    control reads the idle flags before it publishes the new generation
 *   BROKEN_MISSING_UNPIN      a completion forgets to unpin: the pin wait never ends
 *   BROKEN_REVOKE_EARLY       control revokes before the grace period
 *   BROKEN_NO_RECHECK         a worker goes idle without re-checking the ring after re-enabling notifications
 *   BROKEN_WAIT_NO_SLICE      control's wait for a worker has no 10 ms re-check slice (only the 5 s bound)
 *   BROKEN_NO_PIN_WAIT        control revokes after the grace period without waiting for the pins (step 4)
 *   BROKEN_KICK_READ_LATE     a worker reads (resets) its kick eventfd after the re-check instead of before it
 */

#define NW    3            /* queue workers, one queue each */
#define NREG  4            /* guest memory regions; a region keeps its slot for its whole life */
#ifndef NCH
#define NCH   3            /* memory-map changes performed by control (0..3) */
#endif
#ifndef NADD
#define NADD  2            /* chains the driver adds (each followed by a kick when notifications are on) */
#endif
#define PMAX  2            /* bound on a pin count (see PIN) */

/* The memory tables, as bit masks of regions. T0 = {0,1}; change 1: REM_MEM_REG 0 -> {1}; change 2: ADD_MEM_REG 2
 * -> {1,2}; change 3: SET_MEM_TABLE replacing 1 by a new region 3 (a new memfd at the same addresses) -> {2,3}. */
#define TBL(t)     ((t) == 0 -> 3 : ((t) == 1 -> 2 : ((t) == 2 -> 6 : 12)))
#define ADDED(c)   ((c) == 2 -> 4 : ((c) == 3 -> 8 : 0))
#define REMOVED(c) ((c) == 1 -> 1 : ((c) == 3 -> 2 : 0))
#define REMREG(c)  ((c) == 1 -> 0 : ((c) == 3 -> 1 : NREG))   /* the region change c removes; NREG: none */

/* ---- the sync block ---- */
byte gen = 0;              /* generation of the newest table published */
byte seen[NW];             /* newest generation worker w switched to */
bit  idle[NW] = 1;         /* worker w is in (or about to enter) poll() and touches no guest memory */
byte pins[NREG];           /* requests in flight outside a batch that use region r */

/* ---- control ---- */
byte posted = 0;           /* newest table posted to the workers' ports (postMessage queues synchronously) */
byte live = 3;             /* regions mapped and not revoked: mapped before being posted, revoked in step 5 */
byte cwait = 0;            /* w + 1 while control is parked in Atomics.waitAsync on seen[w] */

/* ---- guest rings and kick eventfds ---- */
bit  work[NW];             /* the ring holds a chain not popped yet (avail.idx != last_avail_idx); at most one */
bit  notify[NW] = 1;       /* notifications enabled (VRING_USED_F_NO_NOTIFY clear) */
bit  kick[NW];             /* kick eventfd count > 0 (poll only sees > 0; the read resets it) */

/* ---- the request in flight outside a batch (one at a time) ---- */
byte iow = 0;              /* w + 1: the worker that pinned it and will reap it (0: none) */
byte ireg = 0;             /* r + 1: the region it pinned, where its buffers are */
bit  ioreq = 0;            /* handed to the I/O thread, not executed yet */
bit  cdone = 0;            /* executed: completion posted, completion eventfd count > 0 */

/* ---- ghost state for the properties ---- */
bit  changing = 0;         /* control is inside a change: from step 1 to its reply */
bit  inpoll[NW] = 1;       /* worker w is blocked in (or committed to) poll(-1) */
byte dpend = 0;            /* q + 1 while the driver is between adding a chain to ring q and its kick decision */

/* A touch of guest memory through table t: every region of t is mapped and not revoked. */
#define TOUCH(t)   assert((TBL(t) & live) == TBL(t))
/* A touch of region r1 - 1. */
#define TOUCHR(r1) assert(((1 << ((r1) - 1)) & live) != 0)

/* Atomics.notify(seen[w]): wakes control if it is parked on that word. */
#define NOTIFY_CONTROL(w) if :: cwait == (w) + 1 -> cwait = 0 :: else -> skip fi

/* A lost kick: worker w is blocked in poll, its ring holds a chain, its kick eventfd is 0, and the driver is not
 * between adding that chain and its kick. Nothing will make w look at its ring again. */
#define LOST(w) (inpoll[w] && work[w] && !kick[w] && dpend != (w) + 1)

/* ------------------------------------------------------------------------------------------------ worker */

#define MINE_DONE (iow == w + 1 && cdone)

/* A request that completes outside the batch, in region r: the handler hands it to the I/O thread (postMessage),
 * then pinChain pins the region (Atomics.add): the code's order, still inside the batch. One request in flight at
 * a time (a bound of the model), so a count never exceeds 1 unless an unpin is missing; PMAX only keeps that broken
 * variant's counts finite. */
#define HANDOFF(r) \
  atomic { iow == 0 && (TBL(lt) & (1 << (r))) && pins[r] < PMAX -> iow = w + 1; ireg = (r) + 1; ioreq = 1 } -> \
  pins[r]++

/* poll(0) in a busy loop: notes a readable kick eventfd (the queue is pending already). */
#define POLL0 if :: kick[w] -> kicked = 1 :: else -> skip fi

/* Going idle, after the last touch: Atomics.store(idle[w], 1), Atomics.notify(seen[w]), then poll(-1). */
#ifndef BROKEN_TOUCH_AFTER_IDLE
#define IDLE_STORE idle[w] = 1; NOTIFY_CONTROL(w); inpoll[w] = 1
#else
#define IDLE_STORE idle[w] = 1
#endif

/* The quiescent point's load: g = Atomics.load(gen), kept in g only if it changed. */
#define LOAD_GEN g = gen; if :: g == seen[w] -> g = 0 :: else -> skip fi

active [NW] proctype worker() {
  byte w = _pid;           /* the workers are declared first: pids 0 .. NW - 1 */
  byte lt = 0;             /* generation of the table (and of the cached ring views) in use */
  byte g = 0;              /* a changed gen just loaded (0: unchanged) */
  bit  pend = 0;           /* the queue may have work: kicked, or the batch limit was hit */
  bit  kicked = 0;         /* poll() saw the kick eventfd readable; processQueue reads it after its batch */

  /* starts idle: its queue is running, the ring is empty, notifications are on */
  goto sleeping;

qp:
  atomic { LOAD_GEN };                           /* the quiescent point: Atomics.load(gen) */
batch:
  if
  :: atomic { g != 0 -> lt = posted } ->         /* it changed: drain the port (the newest table), rebuild views */
     atomic { seen[w] = g; g = 0; NOTIFY_CONTROL(w) };   /* Atomics.store(seen[w], g), Atomics.notify */
     goto batch
  :: atomic { g == 0 && MINE_DONE ->             /* a completion: read its eventfd, then reap: pushUsed and */
       cdone = 0; TOUCH(lt)                      /* publish through the current table */
     } ->
#ifndef BROKEN_MISSING_UNPIN
     atomic { pins[ireg - 1]--; iow = 0; ireg = 0 };   /* unpin: Atomics.sub (notifies when it reaches 0) */
#else
     atomic { iow = 0; ireg = 0 };               /* forgets the unpin */
#endif
     goto qp
  :: atomic { g == 0 && !MINE_DONE && pend -> TOUCH(lt); notify[w] = 0 }   /* processQueue: disableNotification */
  :: atomic { g == 0 && !MINE_DONE && !pend -> IDLE_STORE } -> goto idle_stored   /* nothing pending: idle */
  fi;

pop:
  if
  :: atomic { work[w] -> TOUCH(lt); work[w] = 0 } /* popChain: avail.idx, the ring, the descriptors */
  :: atomic { !work[w] -> TOUCH(lt) } -> goto ring_empty
  fi;
  /* The chain completes in the batch (its touches are the pop's), or is handed to the I/O thread and pinned. Then
   * publish, read the kick eventfd if poll saw it, and BATCH_LIMIT (1 chain here) is reached: the queue stays
   * pending, poll(0), back to the quiescent point. */
  if
  :: HANDOFF(0)
  :: HANDOFF(1)
  :: HANDOFF(2)
  :: HANDOFF(3)
  :: atomic { kicked -> kick[w] = 0; kicked = 0 } -> goto busy
  :: atomic { !kicked -> POLL0 } -> goto qp
  fi;
  if
  :: atomic { kicked -> kick[w] = 0; kicked = 0 }
  :: atomic { !kicked -> POLL0 } -> goto qp
  fi;
busy:
  atomic { POLL0 };
  goto qp;

ring_empty:
#ifndef BROKEN_KICK_READ_LATE
  /* the kick eventfd is read after the batch, before the re-check */
  if
  :: atomic { kicked -> kick[w] = 0; kicked = 0 }
  :: atomic { !kicked -> TOUCH(lt); notify[w] = 1 } -> goto rearmed
  fi;
#endif
  /* enableNotification: store the flag, then (SC) load avail.idx again */
  atomic { TOUCH(lt); notify[w] = 1 };
rearmed:
#ifndef BROKEN_NO_RECHECK
  if
  :: atomic { work[w] -> TOUCH(lt); notify[w] = 0 } -> goto pop   /* raced in (its kick may never come) */
  :: atomic { !work[w] -> TOUCH(lt); pend = 0 }                   /* still empty */
  fi;
#else
  pend = 0;                                      /* goes idle without the re-check */
#endif
#ifdef BROKEN_KICK_READ_LATE
  if
  :: atomic { kicked -> kick[w] = 0; kicked = 0 }   /* reads the kick eventfd after the re-check */
  :: else -> skip
  fi;
#endif
  atomic { IDLE_STORE };                         /* Atomics.store(idle[w], 1) after the last touch */

idle_stored:
#ifdef BROKEN_TOUCH_AFTER_IDLE
  atomic { TOUCH(lt); if :: work[w] -> pend = 1 :: else -> skip fi };   /* re-reads avail.idx */
  atomic { NOTIFY_CONTROL(w); inpoll[w] = 1 };
#endif

sleeping:
end_poll:
  /* poll(-1) returns on a kick (the queue becomes pending) or on the completion of its request in flight */
  atomic { kick[w] || MINE_DONE -> inpoll[w] = 0; if :: kick[w] -> kicked = 1; pend = 1 :: else -> skip fi };
#ifdef BROKEN_WAKE_BEFORE_GEN
  atomic { TOUCH(lt) };                          /* looks at the kicked ring before the quiescent point */
#endif
  idle[w] = 0;                                   /* Atomics.store(idle[w], 0), then the load of gen: */
  goto qp                                        /* Dekker with control's store of gen, load of idle */
}

/* ------------------------------------------------------------------------------------------------ I/O thread */

/* Executes the handed-over request: its buffers and status byte (checked at the latest instant it uses them), then
 * posts the completion and writes the completion eventfd. */
active proctype iothread() {
end:
  do
  :: atomic { ioreq -> ioreq = 0; TOUCHR(ireg); cdone = 1 }
  od
}

/* ------------------------------------------------------------------------------------------------ driver */

/* The guest adds a chain (store avail.idx), then (virtio_mb) loads the notification flag and kicks if it is set.
 * Default: NADD chains in all, to any rings (every run is finite). -DLOAD: chains to ring 0 forever (worker 0 under
 * continuous load; the other workers stay idle), for liveness under load. */
#ifndef LOAD
#define COUNT_ADD ; n++
#else
#define COUNT_ADD
#endif

inline add_and_kick(q) {
  atomic { !work[q] -> work[q] = 1; dpend = q + 1 COUNT_ADD };
  t = notify[q];
  if
  :: atomic { t -> kick[q] = 1; dpend = 0; t = 0 }
  :: atomic { !t -> dpend = 0 }
  fi
}

active proctype driver() {
  byte n = 0;
  bit  t = 0;
end:
  do
#ifndef LOAD
  :: n < NADD ->
     if
     :: add_and_kick(0)
     :: add_and_kick(1)
     :: add_and_kick(2)
     fi
  :: else -> break
#else
  :: add_and_kick(0)
#endif
  od
}

/* ------------------------------------------------------------------------------------------------ control */

/* Step 3 for worker w (SyncBlock.waitForReaders, #waitUntil): done when Atomics.load(idle[w]) == 1 or
 * Atomics.load(seen[w]) >= c; else Atomics.waitAsync(seen[w], value, 10 ms): parks unless seen[w] changed, returns
 * when notified or when the 10 ms slice runs out, and control checks again. Its 5 s bound is the failure and is not
 * modelled: a wait that never ends is what the liveness properties catch. */
inline grace(w) {
  do
  :: idle[w] == 1 -> break
  :: else ->
     t = seen[w];
     if
     :: atomic { t >= c -> t = 0 } -> break
     :: atomic { t < c -> if :: seen[w] == t -> cwait = w + 1 :: else -> skip fi; t = 0 } ->
        if
        :: cwait == 0                            /* notified, or seen[w] had changed already */
#ifndef BROKEN_WAIT_NO_SLICE
        :: atomic { cwait != 0 -> cwait = 0 }    /* the 10 ms slice ran out */
#endif
        fi
     fi
  od
}

/* Steps 4 and 5: wait until no request in flight pins the removed region (SyncBlock.waitForPins; after the grace
 * period no new pin can reach it, so its count only goes down and the wait is one blocking load), then revoke it
 * (anonymous memory mapped over it in place), and (step 6) reply. */
inline release_and_reply() {
#ifndef BROKEN_NO_PIN_WAIT
  if
  :: REMREG(c) < NREG -> (pins[REMREG(c)] == 0)
  :: else -> skip
  fi;
#endif
  atomic { live = live & ~REMOVED(c); changing = 0; c++ }
}

active proctype control() {
  byte c = 1;              /* the change in progress; it publishes generation c */
  byte w = 0;
  byte t = 0;
#ifdef BROKEN_IDLE_BEFORE_GEN
  byte early = 0;          /* workers seen idle before the store of gen */
#endif
  do
  :: c <= NCH ->
     /* step 1: map the added region, build T(c), post it to every worker */
     atomic { changing = 1; live = live | ADDED(c); posted = c };
#ifdef BROKEN_IDLE_BEFORE_GEN
     if :: idle[0] -> early = early | 1 :: else -> skip fi;
     if :: idle[1] -> early = early | 2 :: else -> skip fi;
     if :: idle[2] -> early = early | 4 :: else -> skip fi;
#endif
     /* step 2 */
     gen = c;
#ifdef BROKEN_REVOKE_EARLY
     if
     :: REMREG(c) < NREG -> (pins[REMREG(c)] == 0)
     :: else -> skip
     fi;
     live = live & ~REMOVED(c);
#endif
     /* step 3: the grace period */
     do
     :: w < NW ->
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
     release_and_reply()
  :: else -> break
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

/* Liveness, under weak fairness (pan -a -f -N <name>). */
ltl gp_ends { [] (changing -> <> !changing) }
ltl kicks_processed { [] ((work[0] -> <> !work[0]) && (work[1] -> <> !work[1]) && (work[2] -> <> !work[2])) }
