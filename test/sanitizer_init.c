/*
 * test/sanitizer_init.c -- for `bash test/run-tests.sh --asan` only: test/lib.sh
 * builds it into the work directory and the postmaster preloads it between
 * libasan and libubsan.  It works around two problems of sanitizer runtimes
 * preloaded into Debian's (uninstrumented) PostgreSQL:
 *
 * 1. libasan initializes lazily, at the first malloc.  In postgres (and psql)
 *    that malloc comes from libgpg-error's constructor, inside bindtextdomain(),
 *    which holds glibc's gettext lock for writing; ASan's initialization calls
 *    dlerror(), which translates its message and so takes and releases the
 *    same lock.  The lock is left corrupt and the process hangs at its next
 *    gettext call (postgres -V, run by pg_ctl, never returns).  Linked with
 *    -z initfirst, this object's constructor runs before every other
 *    library's, and initializes ASan there.  It must call nothing that could
 *    run other initializers first (dlopen would: libc, not initialized yet,
 *    would then keep a NULL environ).
 *
 * 2. libubsan reads UBSAN_OPTIONS at its first report, from
 *    /proc/self/environ, which in a backend is gone: PostgreSQL writes the
 *    process title over the original argument and environment area.  The
 *    options would be lost (no stacks, no suppressions).  libubsan also asks
 *    the hook __ubsan_default_options, which this object defines (preloaded
 *    before libubsan, its definition comes first): it returns UBSAN_OPTIONS as
 *    the postmaster's start found them, copied here.
 */
#include <string.h>

extern void __asan_init(void);
const char *__ubsan_default_options(void);

static char ubsan_options[8192];

const char *
__ubsan_default_options(void)
{
	return ubsan_options;
}

/*
 * glibc calls initializers with main's arguments: the environment comes from
 * there, since libc is not initialized yet (its environ may be unset).
 */
static void __attribute__((constructor))
dm_sanitizer_init(int argc, char **argv, char **envp)
{
	__asan_init();

	for (char **e = envp; e != NULL && *e != NULL; e++)
	{
		if (strncmp(*e, "UBSAN_OPTIONS=", 14) == 0 &&
			strlen(*e + 14) < sizeof(ubsan_options))
			strcpy(ubsan_options, *e + 14);
	}
}
