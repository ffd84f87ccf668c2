/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  Shared memory of the worker layer (with shared_preload_libraries):
 *	  one entry per database worker and digime.worker_queue_size request
 *	  slots; and the packing of requests and answers into slots, which the
 *	  one-shot workers' DSM segments use as well.
 *
 * IDENTIFICATION
 *	  src/worker/shmem.c
 *
 *-------------------------------------------------------------------------
 */
#include "digime.h"

#include "guc.h"
#include "worker/internal.h"

#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

DmShared   *dm_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static Size
shared_size(void)
{
	Size		size = MAXALIGN(sizeof(DmShared));

	size = add_size(size, MAXALIGN(mul_size(max_worker_processes, sizeof(DmDbWorker))));
	size = add_size(size, mul_size(dm_worker_queue_size, sizeof(DmSlot)));
	return size;
}

static void
request_hook(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(shared_size());
	RequestNamedLWLockTranche("digime", 1);
}

static void
startup_hook(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	dm_shared = ShmemInitStruct("digime", shared_size(), &found);
	if (!found)
	{
		char	   *p = (char *) dm_shared;

		memset(dm_shared, 0, shared_size());
		dm_shared->lock = &(GetNamedLWLockTranche("digime"))->lock;
		dm_shared->ndbs = max_worker_processes;
		dm_shared->nslots = dm_worker_queue_size;
		p += MAXALIGN(sizeof(DmShared));
		dm_shared->dbs = (DmDbWorker *) p;
		p += MAXALIGN(mul_size(max_worker_processes, sizeof(DmDbWorker)));
		dm_shared->slots = (DmSlot *) p;
		for (int i = 0; i < dm_shared->nslots; i++)
			dm_slot_init(&dm_shared->slots[i]);
	}
	LWLockRelease(AddinShmemInitLock);
}

void
dm_worker_shmem_init(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = request_hook;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = startup_hook;
}

void
dm_slot_init(DmSlot *slot)
{
	SpinLockInit(&slot->mutex);
	slot->state = SLOT_FREE;
	slot->abandoned = false;
	slot->sent = false;
	slot->database = InvalidOid;
	slot->caller = NULL;
	slot->worker_pid = 0;
}

DmDbWorker *
dm_db_entry(Oid dboid, bool create)
{
	DmDbWorker *free_entry = NULL;

	for (int i = 0; i < dm_shared->ndbs; i++)
	{
		DmDbWorker *e = &dm_shared->dbs[i];

		if (e->state != DB_UNUSED && e->dboid == dboid)
			return e;
		if (e->state == DB_UNUSED && free_entry == NULL)
			free_entry = e;
	}
	if (!create || free_entry == NULL)
		return NULL;
	memset(free_entry, 0, sizeof(*free_entry));
	free_entry->dboid = dboid;
	free_entry->state = DB_STOPPED;
	return free_entry;
}

DmSlot *
dm_slot_alloc(void)
{
	DmSlot	   *found = NULL;

	LWLockAcquire(dm_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < dm_shared->nslots && found == NULL; i++)
	{
		DmSlot	   *s = &dm_shared->slots[i];

		SpinLockAcquire(&s->mutex);
		if (s->state == SLOT_FREE)
		{
			s->state = SLOT_SUBMITTED;	/* reserved; not visible before database is set */
			s->database = InvalidOid;
			found = s;
		}
		SpinLockRelease(&s->mutex);
	}
	LWLockRelease(dm_shared->lock);
	return found;
}

void
dm_wake_launcher(void)
{
	PGPROC	   *launcher;

	if (dm_shared == NULL)
		return;
	LWLockAcquire(dm_shared->lock, LW_SHARED);
	launcher = dm_shared->launcher;
	LWLockRelease(dm_shared->lock);
	if (launcher != NULL)
		SetLatch(&launcher->procLatch);
}

/* ---------------------------------------------------------------------
 * Packing
 * ---------------------------------------------------------------------
 */

static int
put(DmRequest *r, const char *s)
{
	int			off = r->used;
	size_t		len;

	if (s == NULL)
		return -1;
	len = strlen(s) + 1;
	if (r->used + len > sizeof(r->data))
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("digime request is too large for a worker slot")));
	memcpy(r->data + off, s, len);
	r->used += len;
	return off;
}

void
dm_request_pack(DmRequest *r, const DmRequestArgs *a)
{
	r->kind = a->kind;
	r->role = a->actor.role;
	r->is_admin = a->actor.is_admin;
	r->audit_ok = a->audit_ok;
	r->token_id = a->token_id;
	r->within_ms = a->within_ms;
	r->concurrency = a->concurrency;
	r->max_tokens = a->max_tokens;
	r->retention_s = a->retention_s;
	r->audit_retention_s = a->audit_retention_s;
	r->used = 0;
	r->end_user = put(r, a->actor.end_user);
	r->audit_action = put(r, a->audit_action);
	r->contract_id = put(r, a->contract_id);
	r->state = put(r, a->state);
	r->code = put(r, a->code);
	r->code_verifier = put(r, a->code_verifier);
	r->account_reference = put(r, a->account_reference);
	r->sqlstate = put(r, a->sqlstate);
	r->reference = put(r, a->reference);
}

static const char *
get(const DmRequest *r, int off)
{
	return off < 0 ? NULL : pstrdup(r->data + off);
}

void
dm_request_unpack(const DmRequest *r, DmRequestArgs *a)
{
	memset(a, 0, sizeof(*a));
	a->kind = r->kind;
	a->actor.role = r->role;
	a->actor.is_admin = r->is_admin;
	a->actor.end_user = (char *) get(r, r->end_user);
	a->audit_ok = r->audit_ok;
	a->token_id = r->token_id;
	a->within_ms = r->within_ms;
	a->concurrency = r->concurrency;
	a->max_tokens = r->max_tokens;
	a->retention_s = r->retention_s;
	a->audit_retention_s = r->audit_retention_s;
	a->audit_action = get(r, r->audit_action);
	a->contract_id = get(r, r->contract_id);
	a->state = get(r, r->state);
	a->code = get(r, r->code);
	a->code_verifier = get(r, r->code_verifier);
	a->account_reference = get(r, r->account_reference);
	a->sqlstate = get(r, r->sqlstate);
	a->reference = get(r, r->reference);
}

static int
put_text(DmSlotReply *r, const char *s)
{
	int			off = r->used;
	size_t		room = sizeof(r->text) - r->used;

	if (s == NULL || room < 2)
		return -1;
	strlcpy(r->text + off, s, room);
	r->used += strlen(r->text + off) + 1;
	return off;
}

void
dm_reply_set_error(DmSlotReply *r, const ErrorData *e)
{
	r->ok = false;
	r->sqlerrcode = e->sqlerrcode;
	r->used = 0;
	r->message = put_text(r, e->message);
	r->detail = put_text(r, e->detail);
	r->hint = put_text(r, e->hint);
}

void
dm_reply_set_lost(DmSlotReply *r)
{
	r->ok = false;
	r->sqlerrcode = ERRCODE_DIGIME_WORKER_LOST;
	r->used = 0;
	r->message = put_text(r, "the digime worker exited before it answered");
	r->detail = put_text(r, "A request that reached digi.me may have been completed there; "
						 "its result was not stored.");
	r->hint = -1;
}
