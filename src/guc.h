/*-------------------------------------------------------------------------
 *
 * guc.h
 *	  The digime.* settings (README, "Settings").
 *
 * IDENTIFICATION
 *	  src/guc.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef DIGIME_GUC_H
#define DIGIME_GUC_H

/* the API */
extern char *dm_base_url;			/* digime.base_url, always ends in '/' */
extern char *dm_onboard_url;		/* digime.onboard_url, always ends in '/' */
extern char *dm_ca_file;			/* digime.ca_file, "" = system CAs only */
extern int	dm_timeout_ms;			/* digime.timeout_ms: whole request */
extern int	dm_connect_timeout_ms;	/* digime.connect_timeout_ms */
extern int	dm_retry_limit;			/* digime.retry_limit: extra attempts */
extern int	dm_jwks_cache_ttl;		/* digime.jwks_cache_ttl, seconds */
extern char *dm_agent_name;			/* digime.agent_name */
extern char *dm_agent_version;		/* digime.agent_version */

/* the flow */
extern int	dm_authorization_ttl;	/* digime.authorization_ttl, seconds */
extern int	dm_refresh_margin;		/* digime.refresh_margin, seconds */
extern char *dm_end_user;			/* digime.end_user */

/* secrets at rest */
extern char *dm_key_file;			/* digime.key_file (postmaster) */
extern char *dm_previous_key_file;	/* digime.previous_key_file (postmaster) */

/* the worker */
extern int	dm_worker_naptime;		/* digime.worker_naptime, seconds */
extern int	dm_worker_max_inflight; /* digime.worker_max_inflight */
extern int	dm_worker_queue_size;	/* digime.worker_queue_size (postmaster) */
extern int	dm_worker_lock_timeout; /* digime.worker_lock_timeout, ms */
extern int	dm_inbox_max_attempts;	/* digime.inbox_max_attempts */
extern bool dm_auto_refresh;		/* digime.auto_refresh */
extern int	dm_auto_refresh_within; /* digime.auto_refresh_within, seconds */
extern int	dm_auto_refresh_interval;	/* digime.auto_refresh_interval, seconds */
extern int	dm_authorization_retention; /* digime.authorization_retention, seconds */
extern int	dm_audit_retention;		/* digime.audit_retention, seconds */

/* Defines every digime.* setting; preloading: loaded by the postmaster. */
extern void dm_guc_init(bool preloading);

/* digime.end_user, or NULL when unset. */
extern const char *dm_guc_end_user(void);

#endif							/* DIGIME_GUC_H */
