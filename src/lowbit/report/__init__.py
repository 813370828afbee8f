"""lowbit.report"""
